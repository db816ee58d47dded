"""model.py against independent references: a loop-and-softmax GPT, log_softmax + gather, hand-computed masked
statistics, and properties (causality, KV cache = recompute, padding changes nothing, checkpoints round-trip)."""
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from data import pad_left
from model import GPT, GPTConfig, ScalarHeadModel, load_checkpoint, load_model, save_checkpoint, token_logprobs
from ppo import masked_mean, masked_whiten

V = 64  # vocab of the test models


def tiny_config(causal=True):
    return GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32, causal=causal)


def sharpen(model, seed=0):
    """Redraw every weight with a larger scale than GPT-2's init, so attention is far from uniform and argmaxes are
    decisive (a near-tie could make greedy decoding depend on rounding)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tiny_gpt(causal=True, seed=0):
    return sharpen(GPT(tiny_config(causal)), seed)


def naive_logits(model, ids):
    """The same network written out for one unpadded sequence (T,): explicit loops over heads, queries and keys,
    softmax by hand. Shares only the weights with model.py."""
    cfg, tr = model.config, model.transformer
    C, hs, T = cfg.n_embd, cfg.n_embd // cfg.n_head, len(ids)
    x = tr.wte.weight[ids] + tr.wpe.weight[:T]  # (T, C)
    for block in tr.h:
        a = F.layer_norm(x, (C,), block.ln_1.weight, block.ln_1.bias)
        q, k, v = (a @ block.attn.c_attn.weight.T).split(C, dim=1)  # (T, C) each
        y = torch.zeros(T, C)
        for h in range(cfg.n_head):
            s = slice(h * hs, (h + 1) * hs)
            for i in range(T):
                keys = list(range(i + 1)) if cfg.causal else list(range(T))
                scores = torch.stack([q[i, s] @ k[j, s] for j in keys]) / math.sqrt(hs)
                w = (scores - scores.max()).exp()
                w = w / w.sum()
                y[i, s] = sum(w[n] * v[j, s] for n, j in enumerate(keys))
        x = x + y @ block.attn.c_proj.weight.T
        m = F.layer_norm(x, (C,), block.ln_2.weight, block.ln_2.bias)
        x = x + F.gelu(m @ block.mlp.c_fc.weight.T) @ block.mlp.c_proj.weight.T
    x = F.layer_norm(x, (C,), tr.ln_f.weight, tr.ln_f.bias)
    return x @ model.lm_head.weight.T  # (T, V): the output layer, untied from the embedding


# ----------------------------------------------------------------------------- the forward pass

@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_logits_match_naive_implementation(causal):
    model = tiny_gpt(causal)
    ids = torch.randint(V, (9,), generator=torch.Generator().manual_seed(1))
    expected = naive_logits(model, ids)  # (T, V)
    logits, _ = model(ids[None])
    torch.testing.assert_close(logits[0], expected, atol=1e-4, rtol=1e-4)
    # the same sequence left-padded by 3 junk tokens, through the attention_mask path
    padded = torch.cat([torch.tensor([5, 6, 7]), ids])[None]
    mask = torch.arange(12)[None] >= 3
    logits, _ = model(padded, attention_mask=mask)
    torch.testing.assert_close(logits[0, 3:], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_future_tokens_do_not_change_past_logits(padded):
    model = tiny_gpt(causal=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(V, (2, 16), generator=g)
    y = x.clone()
    y[:, 8:] = torch.randint(V, (2, 8), generator=g)  # a different future from position 8 on
    # padded=True: one left pad per row, so attention goes through the explicit mask instead of SDPA's is_causal
    mask = (torch.arange(16) >= 1).expand(2, 16) if padded else None
    lx, _ = model(x, attention_mask=mask)
    ly, _ = model(y, attention_mask=mask)
    torch.testing.assert_close(lx[:, :8], ly[:, :8], atol=1e-6, rtol=0)
    assert (lx[:, 8:] - ly[:, 8:]).abs().max() > 1e-2  # the change itself does reach the model


@torch.no_grad()
def test_bidirectional_model_sees_future_tokens():
    model = tiny_gpt(causal=False)
    x = torch.randint(V, (2, 16), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V  # change only the last token
    lx, _ = model(x)
    ly, _ = model(y)
    assert ((lx[:, 0] - ly[:, 0]).abs().max(dim=-1).values > 1e-3).all()  # even the first position moves


@torch.no_grad()
def test_sequence_longer_than_block_size_is_rejected():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_loss_is_mean_cross_entropy_over_unmasked_targets():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(3)
    x = torch.randint(V, (2, 6), generator=g)
    targets = torch.randint(V, (2, 6), generator=g)
    targets[0, :4] = -1
    targets[1, 5] = -1
    logits, loss = model(x, targets)
    logp = logits.log_softmax(-1)
    kept = [(b, t) for b in range(2) for t in range(6) if targets[b, t] != -1]
    expected = -sum(logp[b, t, targets[b, t]] for b, t in kept) / len(kept)
    torch.testing.assert_close(loss, expected)


# ----------------------------------------------------------------------------- the two attention paths

def with_attention(model, attention):
    """The same weights, attention computed the other way (GPTConfig.attention; the blocks read it at each call)."""
    model.config.attention = attention
    return model


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_manual_attention_equals_the_fused_kernel(causal):
    """softmax(q k^T / sqrt(hs)) v written out equals F.scaled_dot_product_attention: on full rows (SDPA's is_causal
    kernel), on left-padded rows (an explicit mask), and against the naive per-query loop."""
    model = tiny_gpt(causal)
    g = torch.Generator().manual_seed(11)
    x = torch.randint(V, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :2] = mask[2, :4] = False  # left padding
    fused_full, fused_padded = model(x)[0], model(x, attention_mask=mask)[0]
    with_attention(model, "manual")
    torch.testing.assert_close(model(x)[0], fused_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, attention_mask=mask)[0][mask], fused_padded[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x[:1])[0][0], naive_logits(model, x[0]), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_manual_attention_with_the_kv_cache_equals_recompute_and_the_fused_path():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(12)
    idx, mask = pad_left([torch.randint(V, (n,), generator=g) for n in (3, 6, 4)], 0)
    fused = model.generate(idx, 10, temperature=0, attention_mask=mask)
    with_attention(model, "manual")
    cached = model.generate(idx, 10, temperature=0, attention_mask=mask)
    assert torch.equal(cached, model.generate(idx, 10, temperature=0, attention_mask=mask, use_cache=False))
    assert torch.equal(cached, fused)


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def test_kv_cache_generation_equals_recompute():
    model = tiny_gpt()
    idx = torch.randint(V, (3, 5), generator=torch.Generator().manual_seed(4))
    cached = model.generate(idx, 12, temperature=0)
    recomputed = model.generate(idx, 12, temperature=0, use_cache=False)
    assert cached.shape == (3, 17)
    assert torch.equal(cached[:, :5], idx)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[:, 5:].flatten().tolist())) > 3  # not a degenerate constant output


@torch.no_grad()
def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(V, (n,), generator=g) for n in (3, 7, 5)]
    idx, mask = pad_left(prompts, 0)  # (3, 7)
    cached = model.generate(idx, 10, temperature=0, attention_mask=mask)
    recomputed = model.generate(idx, 10, temperature=0, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, recomputed)
    for row, p in zip(cached, prompts):
        alone = model.generate(p[None], 10, temperature=0)[0]
        assert torch.equal(row[7:], alone[len(p):])


@torch.no_grad()
def test_rows_stop_at_eos_and_are_padded_after_it():
    model = tiny_gpt()
    idx = torch.randint(V, (3, 4), generator=torch.Generator().manual_seed(6))
    plain = model.generate(idx, 12, temperature=0)  # no EOS: the reference continuation
    eos = int(plain[0, 4 + 2])  # what row 0 says at its third step becomes the EOS token
    out = model.generate(idx, 12, temperature=0, eos_token_id=eos)
    assert out.size(0) == 3 and out.size(1) <= 16
    for b in range(3):
        hits = (plain[b, 4:] == eos).nonzero()
        if len(hits):  # identical up to and including the first EOS, then only padding with EOS
            stop = 4 + int(hits[0]) + 1
            assert torch.equal(out[b, :stop], plain[b, :stop])
            assert (out[b, stop:] == eos).all()
        else:  # never says EOS: unaffected
            assert torch.equal(out[b], plain[b, :out.size(1)])
    # once every row has ended, generation stops early
    first = int(plain[1, 4])
    assert model.generate(idx[1:2], 12, temperature=0, eos_token_id=first).shape == (1, 5)


# ----------------------------------------------------------------------------- log-probabilities and masked statistics

def test_token_logprobs_matches_log_softmax_and_gather():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    targets = torch.randint(11, (2, 5), generator=g)
    expected = F.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(logits, targets), expected)
    # by hand: logits (0, ln 3) are probabilities (1/4, 3/4)
    hand = token_logprobs(torch.tensor([[[0.0, math.log(3.0)]]]), torch.tensor([[1]]))
    assert hand.item() == pytest.approx(math.log(0.75))


def test_masked_mean_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # the kept values are 1, 2, 4: mean 7/3, population variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 3 = 14/9
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(x, torch.tensor([[0, 0, 0], [1, 1, 1]])).item() == pytest.approx(54 / 3)  # row 2 alone
    w = masked_whiten(x, mask)
    std = math.sqrt(14 / 9)
    torch.testing.assert_close(w[mask.bool()], torch.tensor([-4 / 3, -1 / 3, 5 / 3]) / std)
    assert masked_mean(w, mask).abs().item() < 1e-6 and masked_mean(w ** 2, mask).item() == pytest.approx(1, abs=1e-6)
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # an empty mask is not a division by zero


# ----------------------------------------------------------------------------- the scalar head

@torch.no_grad()
def test_scalar_head_ignores_right_padding():
    model = sharpen(ScalarHeadModel(tiny_config()))
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(V, (1, 6), generator=g)
    padded = torch.cat([ids, torch.randint(V, (1, 4), generator=g)], dim=1)  # 4 junk tokens after the sequence
    scores = model(ids)
    assert scores.shape == (1, 6)
    torch.testing.assert_close(model(padded)[:, :6], scores, atol=1e-6, rtol=0)


@torch.no_grad()
def test_scalar_head_from_gpt_copies_the_trunk():
    gpt = tiny_gpt()
    rm = ScalarHeadModel.from_gpt(gpt, readout="mean")
    ids = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(rm.gpt.trunk(ids), gpt.trunk(ids))
    assert rm.config.readout == "mean" and gpt.config.readout == "last"  # the policy's own config is left alone


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("cls", [GPT, ScalarHeadModel])
@torch.no_grad()
def test_checkpoint_round_trip(tmp_path, cls):
    model = sharpen(cls(tiny_config()))
    path = tmp_path / "stage" / "model.pt"  # the folder does not exist yet
    save_checkpoint(str(path), model, step=7)
    assert os.listdir(path.parent) == ["model.pt"]  # the temporary file was renamed away
    ckpt = load_checkpoint(str(path))
    assert ckpt["step"] == 7 and ckpt["kind"] == cls.__name__ and ckpt["config"]["n_embd"] == 32
    loaded = load_model(str(path))
    assert type(loaded) is cls
    ids = torch.randint(V, (2, 7), generator=torch.Generator().manual_seed(10))
    before, after = model(ids), loaded(ids)
    if cls is GPT:
        before, after = before[0], after[0]
    assert torch.equal(before, after)


class Payload:
    """Unpickling this would call open(path, "w"); a weights_only load must refuse before it does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_with_code_is_refused(tmp_path):
    path, marker = str(tmp_path / "evil.pt"), str(tmp_path / "pwned")
    torch.save({"model": {}, "config": {}, "kind": "GPT", "extra": Payload(marker)}, path)
    with pytest.raises(RuntimeError, match="evil.pt"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint(str(tmp_path / "nowhere.pt"))


# ----------------------------------------------------------------------------- the CUDA path falls back on CPU

def test_cpu_path_runs_in_fp32_and_cuda_path_in_bf16(monkeypatch):
    import stages
    from runs import autocast, pick_device, to_device
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (2, 8))
    with autocast("cpu"):
        logits, _ = model(x)
    assert logits.dtype == torch.float32  # no autocast on CPU: bf16 matmuls are slow there
    with warnings.catch_warnings():  # without CUDA, torch warns that this autocast would be disabled
        warnings.simplefilter("ignore")
        assert autocast("cuda").fast_dtype == torch.bfloat16
    assert to_device(x, "cpu") is x  # no pinning, no copy
    assert not stages.make_optimizer(model, 1e-3, 0.1, "cpu").defaults["fused"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"


@pytest.mark.parametrize("cuda, preset", [(False, "small"), (True, "medium")])
def test_auto_preset_follows_cuda(monkeypatch, cuda, preset):
    import sft
    from runs import parse_config
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = parse_config(sft.Config, [], sft.PRESETS)
    assert cfg.preset == preset
    assert cfg.n_embd == (sft.PRESETS["medium"]["n_embd"] if cuda else sft.Config().n_embd)
    assert parse_config(sft.Config, ["--n_embd=64"], sft.PRESETS).n_embd == 64  # a flag beats the preset


# ----------------------------------------------------------------------------- supervised steps in bf16 where it pays

def test_train_dtype_is_bf16_on_cuda_and_on_a_cpu_with_bf16_units(monkeypatch):
    import model
    monkeypatch.setattr(model, "CPU_BF16", [])  # a CPU without bf16 units: there bf16 is emulated, slowly
    assert [model.train_dtype(d) for d in ("cpu", "mps", "cuda")] == ["float32", "float32", "bfloat16"]
    monkeypatch.setattr(model, "CPU_BF16", ["avx512_bf16"])
    assert model.train_dtype("cpu") == "bfloat16" and model.train_dtype("cpu", "float32") == "float32"  # flag wins
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with model.train_autocast("cpu", "bfloat16"):
        assert layer(x).dtype == torch.bfloat16
    with model.train_autocast("cpu", "float32"):
        assert layer(x).dtype == torch.float32


def test_a_bf16_step_computes_the_fp32_loss_and_gradient_to_bf16_precision():
    # autocast keeps the weights and the optimiser in fp32 and runs the matmuls in bf16 (8 bits of mantissa)
    from model import train_autocast
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    grads = []
    for dtype in ("float32", "bfloat16"):
        model.zero_grad()
        with train_autocast("cpu", dtype):
            _, loss = model(x, y)
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, g32), (loss16, g16) = grads
    assert abs(loss16 - loss32) < 1e-2 * loss32
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99
    assert all(p.dtype == torch.float32 for p in model.parameters())
