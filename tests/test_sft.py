"""sft.py: the SFT loss against a hand-computed mean, training lowers it, seeds reproduce, the stages run end to end
with a tiny Config, and the command line rejects what it does not know."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import data
import sft
import stages
import runs
from model import GPT, GPTConfig, load_model
from runs import parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(tmp_path, **overrides):
    cfg = sft.Config(n_layer=1, n_head=2, n_embd=32, block_size=192, n_docs=100, n_demos=50, pretrain_steps=3,
                     sft_steps=3, batch_size=4, eval_prompts=4, max_new_tokens=16, out_dir=str(tmp_path),
                     preset="small", device="cpu")
    return dataclasses.replace(cfg, **overrides)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=192, n_layer=1, n_head=2, n_embd=32))


# ----------------------------------------------------------------------------- the SFT loss

def test_sft_loss_is_the_mean_over_response_tokens_only():
    examples = data.sft_examples(3)
    tensors = data.sft_tensors(examples, block_size=192)
    ids = data.pad_right([t[0] for t in tensors], data.special(data.PAD))  # (B, T)
    labels = data.pad_right([t[1] for t in tensors], -1)  # (B, T)
    model = tiny_lm()
    logits, loss = model(ids, labels)
    logits.retain_grad()
    # by hand, from the raw texts: position t predicts token t + 1, and only response tokens (and the EOT) count
    logp = logits.detach().log_softmax(-1)
    total, count = 0.0, 0
    for b, ex in enumerate(examples):
        P = len(data.encode(data.alpaca_prompt(ex["instruction"], ex["input"])))
        response = data.encode(ex["output"]) + [data.special(data.EOT)]
        for j, tok in enumerate(response):
            total -= logp[b, P - 1 + j, tok].item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    # the loss does not depend on the logits at prompt or padding positions at all
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert torch.equal(touched, labels != -1)


def test_garbage_at_prompt_labels_counts_unless_masked():
    [(ids, labels)] = data.sft_tensors(data.sft_examples(1), block_size=192)
    model = tiny_lm()
    prompt = labels == -1
    garbage = torch.where(prompt, torch.randint(100, labels.shape, generator=torch.Generator().manual_seed(0)),
                          labels)
    _, loss = model(ids[None], labels[None])
    _, with_garbage = model(ids[None], garbage[None])
    _, masked_again = model(ids[None], torch.where(prompt, -1, garbage)[None])
    assert with_garbage.item() != pytest.approx(loss.item())  # prompt labels would change the loss ...
    assert masked_again.item() == loss.item()  # ... which is why they are -1


def test_finetune_lowers_the_loss(tmp_path):
    examples = data.sft_tensors(data.sft_examples(16), block_size=192)
    model = tiny_lm()
    cfg = tiny_cfg(tmp_path, lr=3e-2)
    before = sft.sft_val_loss(model, examples, "cpu")
    history = sft.finetune(model, examples, 15, 1e-2, cfg, "cpu")
    after = sft.sft_val_loss(model, examples, "cpu")
    assert len(history) == 15 and before == pytest.approx(math.log(model.config.vocab_size), abs=0.3)
    assert after < before - 1.0


def test_length_grouped_batches_draw_every_row_alike_and_pad_little():
    lengths = [len(e[0]) for e in data.sft_tensors(data.sft_examples(2000, seed=0), 192)]
    batches = sft.length_grouped(lengths, 32, torch.Generator().manual_seed(0), groups=8)
    drawn = [next(batches) for _ in range(800)]
    assert all(len(b) == 32 for b in drawn)
    for block in range(0, 800, 8):  # each group of 8 batches: one draw of 256 rows, sorted and cut in 8
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in drawn[block:block + 8])
        assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
    counts = torch.bincount(torch.cat(drawn), minlength=len(lengths)).double()  # 25600 draws of 2000 rows
    assert abs(counts.std() / counts.mean() - 12.8 ** -0.5) < 0.03  # uniform, with replacement: 12.8 +- sqrt(12.8)
    real = lambda bs: sum(lengths[i] for b in bs for i in b) / sum(32 * max(lengths[i] for i in b) for b in bs)
    at_random = [torch.randint(len(lengths), (32,), generator=torch.Generator().manual_seed(s)) for s in range(200)]
    assert real(drawn) > 0.9 > 0.8 > real(at_random)  # of the padded tokens, the real ones


def test_sequence_logprobs_sums_response_tokens_and_ignores_padding():
    model = tiny_lm()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(700, (n,), generator=g) for n in (4, 9)]
    responses = [torch.randint(700, (n,), generator=g) for n in (6, 2)]
    batched = sft.sequence_logprobs(model, prompts, responses)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logp = model(torch.cat([p, r])[None])[0][0].log_softmax(-1)  # (T, V), one unpadded sequence
        expected = sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(r.tolist()))
        assert batched[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_win_rate_counts_ties_as_half():
    prompts = [data.alpaca_prompt("Write a story about Tom.")] * 3
    good, bad = "Tom was happy. The end.", "Tom was sad."
    assert sft.win_rate(prompts, [good, bad, good], [bad, good, good]) == pytest.approx((1 + 0 + 0.5) / 3)


def test_lr_schedule_by_hand():
    assert stages.lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)  # warm-up: (step + 1) / warmup
    assert stages.lr_at(10, 100, 1.0, warmup=10) == pytest.approx(1.0)  # the peak
    assert stages.lr_at(55, 100, 1.0, warmup=10) == pytest.approx(0.55)  # half way: lr/10 + 0.9 * 0.5
    assert stages.lr_at(100, 100, 1.0, warmup=10) == pytest.approx(0.1)  # decayed to lr/10


# ----------------------------------------------------------------------------- the stages, tiny

def test_pretrain_same_seed_same_losses(tmp_path):
    a = sft.pretrain(tiny_cfg(tmp_path / "a", stage="pretrain"))
    b = sft.pretrain(tiny_cfg(tmp_path / "b", stage="pretrain"))
    c = sft.pretrain(tiny_cfg(tmp_path / "c", stage="pretrain", seed=1))
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert a["val_loss"] == b["val_loss"]
    assert [h["loss"] for h in a["history"]] != [h["loss"] for h in c["history"]]  # the seed does matter
    with open(tmp_path / "a" / "pretrain" / "metrics.json") as f:
        assert json.load(f)["history"] == a["history"]
    assert load_model(str(tmp_path / "a" / "pretrain" / "model.pt")).config.causal


def test_pretrain_mlm(tmp_path):
    metrics = sft.pretrain(tiny_cfg(tmp_path, stage="pretrain", objective="mlm"))
    assert metrics["objective"] == "mlm" and all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert not load_model(str(tmp_path / "pretrain_mlm" / "model.pt")).config.causal
    assert not os.path.exists(tmp_path / "pretrain")  # the masked LM never stands in for the causal one


def test_pretrain_on_a_user_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(data.pretrain_corpus(60, seed=5)))
    metrics = sft.pretrain(tiny_cfg(tmp_path, stage="pretrain", corpus=str(corpus)))
    assert len(metrics["history"]) == 3


def test_sft_end_to_end(tmp_path):
    metrics = sft.sft(tiny_cfg(tmp_path))  # builds the missing stage 1 first, with the same tiny settings
    with open(tmp_path / "pretrain" / "metrics.json") as f:
        assert json.load(f)["config"]["n_layer"] == 1
    for key in ("gold_reward", "template_eos_rate", "follow_rate", "val_loss", "pretrained", "history"):
        assert key in metrics
    assert len(metrics["history"]) == 3 and "val_loss" in metrics["pretrained"]
    assert 0 <= metrics["template_eos_rate"] <= 1 and 0 <= metrics["follow_rate"] <= 1
    with open(tmp_path / "sft" / "metrics.json") as f:
        saved = json.load(f)
    assert saved.pop("built_from")["stage"] == "sft"  # the record, also in the checkpoint (tests/test_chain.py)
    assert saved == json.loads(json.dumps(metrics))
    assert load_model(str(tmp_path / "sft" / "model.pt")).config.n_layer == 1
    assert sorted(os.listdir(tmp_path / "sft")) == ["metrics.json", "model.pt"]


def test_sft_on_a_user_jsonl(tmp_path):
    cfg = tiny_cfg(tmp_path, sft_steps=1, eval_prompts=2, max_new_tokens=4)
    demos = tmp_path / "demos.jsonl"
    runs.save_jsonl(str(demos), data.sft_examples(8))
    metrics = sft.sft(dataclasses.replace(cfg, data=str(demos)))
    assert metrics["config"]["data"] == str(demos)


# ----------------------------------------------------------------------------- the command line

def test_unknown_flag_lists_the_valid_ones():
    with pytest.raises(SystemExit) as e:
        parse_config(sft.Config, ["--n_layers=2"], sft.PRESETS)
    message = str(e.value)
    assert "--n_layers" in message
    for f in dataclasses.fields(sft.Config):
        assert f"--{f.name}" in message


def test_both_flag_forms_and_types():
    cfg = parse_config(sft.Config, ["--n_layer", "3", "--lr=1e-3", "--corpus=a=b.txt"], sft.PRESETS)
    assert cfg.n_layer == 3 and cfg.lr == 0.001 and cfg.corpus == "a=b.txt"  # only the first "=" splits
    with pytest.raises(SystemExit, match="--n_layer=three: must be an integer"):
        parse_config(sft.Config, ["--n_layer=three"], sft.PRESETS)
    with pytest.raises(SystemExit, match="needs a value"):
        parse_config(sft.Config, ["--n_layer"], sft.PRESETS)
    with pytest.raises(SystemExit, match="unexpected argument"):
        parse_config(sft.Config, ["n_layer=3"], sft.PRESETS)


def test_bool_flags():
    @dataclass
    class Flags:
        verbose: bool = False

    assert parse_config(Flags, ["--verbose=yes"]).verbose is True
    assert parse_config(Flags, ["--verbose", "0"]).verbose is False
    with pytest.raises(SystemExit, match="--verbose=maybe: must be true or false"):
        parse_config(Flags, ["--verbose=maybe"])


def test_presets():
    medium = parse_config(sft.Config, ["--preset=medium"], sft.PRESETS)
    assert medium.preset == "medium" and medium.n_embd == sft.PRESETS["medium"]["n_embd"] != sft.Config.n_embd
    # an explicit flag wins over the preset, before or after it
    for argv in (["--n_embd=64", "--preset=medium"], ["--preset", "medium", "--n_embd", "64"]):
        cfg = parse_config(sft.Config, argv, sft.PRESETS)
        assert cfg.n_embd == 64 and cfg.n_layer == sft.PRESETS["medium"]["n_layer"]
    assert parse_config(sft.Config, [], sft.PRESETS).preset == ("medium" if torch.cuda.is_available() else "small")
    with pytest.raises(SystemExit, match="--preset=tpu: must be one of auto, small, medium"):
        parse_config(sft.Config, ["--preset=tpu"], sft.PRESETS)


def test_help_shows_the_field_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(sft.Config, ["--help"], sft.PRESETS)
    assert e.value.code == 0
    out = capsys.readouterr().out  # the Config's own source: every field with its default and its docstring
    assert 'n_docs: int = 20000\n    """stories in the generated pretraining corpus"""' in out
    assert "'medium': {'n_layer': 6" in out  # and the presets


def test_cli_rejects_unknown_flag():
    result = subprocess.run([sys.executable, "sft.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode != 0
    assert "unknown flag --bogus" in result.stderr and "--stage" in result.stderr and "--n_layer" in result.stderr


def test_sft_loss_is_the_mean_over_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)  # (B, T, V)
    labels = torch.tensor([[-1, -1, 3, 4, -1], [-1, 2, 6, -1, -1]])  # -1: prompt and padding
    naive = [-torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(5)
             if labels[b, t] != -1]  # one term per response token, 4 in all
    assert torch.allclose(sft.sft_loss(logits, labels), torch.stack(naive).mean())
    logits2 = logits.clone()
    logits2[0, 0] += 5.0  # a prompt position: its logits change nothing
    assert torch.equal(sft.sft_loss(logits2, labels), sft.sft_loss(logits, labels))
