"""
A small GPT in plain PyTorch, the model every stage shares.

nanoGPT's architecture (Radford et al. 2019): learned position embeddings, pre-LayerNorm blocks, causal
self-attention softmax(Q K^T / sqrt(hs)) V, a GELU MLP. Departures:
  - the token embedding is not tied to the output layer and starts at unit scale (as in nanochat), so words the
    world uses in the same contexts keep embeddings of their own (see GPT.__init__).
  - `causal=False` runs the same blocks bidirectionally, for the masked-LM objective (BERT, Devlin et al. 2019).
  - `attention_mask` (B, T) lets left-padded prompts share a batch: pad keys are hidden and positions count real
    tokens only, so a padded row computes exactly what it would alone.
  - `generate` keeps a KV cache; `use_cache=False` recomputes the prefix every step (the readable version, and
    the test oracle for the cache).
  - `ScalarHeadModel` puts a linear head on the trunk: one number per position, for the reward model and critic.
  - attention runs through PyTorch's fused kernel (F.scaled_dot_product_attention); `GPTConfig.attention="manual"`
    computes the same equation in four readable lines (CausalSelfAttention.forward), and a test checks they agree.

Shapes: B batch, T time, C channels (n_embd), V vocab, nh heads, hs head size (C // nh),
        P prompt length, R response length.
"""
import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from runs import CheckpointError, atomic_write, read_text


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    block_size: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    causal: bool = True  # False: bidirectional attention, for the masked-LM objective
    readout: str = "last"  # a reward model's score (rm_scores): the "last" real token's, or the "mean" over
    #                        the response's tokens; saved with the model, so an older reward model reads as it trained
    attention: str = "fused"  # "fused": F.scaled_dot_product_attention; "manual": the equation written out


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated: (n_layer, B, nh, T_max, hs)."""

    def __init__(self, config, B, T_max, device):
        self.shape = (config.n_layer, B, config.n_head, T_max, config.n_embd // config.n_head)
        self.k = self.v = None  # allocated at the first update, in the dtype autocast gives the keys
        self.pos = 0  # how many time steps are filled
        self.key_mask = torch.zeros(B, T_max, dtype=torch.bool, device=device)  # which cached keys are real tokens
        self.next_position = torch.zeros(B, dtype=torch.long, device=device)  # position id of each row's next token

    def update(self, layer, k, v):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=k.device, dtype=k.dtype)
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]  # (B, nh, pos+T, hs)


def attention_allowed(key_mask, T_q, causal):
    """Boolean (B, 1, T_q, T_k): may query i see key j? The queries are the last T_q of the T_k positions."""
    B, T_k = key_mask.shape
    allowed = key_mask[:, None, None, :].expand(B, 1, T_q, T_k)
    q_pos = torch.arange(T_k - T_q, T_k, device=key_mask.device)[:, None]  # (T_q, 1) absolute query positions
    k_pos = torch.arange(T_k, device=key_mask.device)[None, :]  # (1, T_k)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    # a query always sees itself, so a pad query never has an empty row (its output is never used)
    return allowed | (k_pos == q_pos)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout, self.causal, self.config = config.n_head, config.dropout, config.causal, config

    def forward(self, x, allowed=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, T_k, hs): the cached prefix plus these T steps
        if self.config.attention == "manual":
            if allowed is None:  # full rows: query i sees keys 0..i (or every key, bidirectionally)
                allowed = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device)
                allowed = allowed.tril(k.size(2) - T) if self.causal else allowed
            # softmax(q k^T / sqrt(hs)) v, with the keys a query may not see at -inf before the softmax
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T_k)
            att = F.softmax(att.masked_fill(~allowed, float("-inf")), dim=-1)
            y = F.dropout(att, self.dropout, self.training) @ v  # (B, nh, T, hs)
        else:  # the same equation in one fused kernel; with no mask to apply, is_causal picks the flash kernel
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0,
                is_causal=self.causal and allowed is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, allowed=None, cache=None, layer=0):
        # pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))
        x = x + self.attn(self.ln_1(x), allowed, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Untied, unit-scale embeddings. Words the world uses in the same contexts (its twelve animals) get the
        # same gradients; tied to the output layer and initialised at 0.02, their embeddings converge (cosine 0.95)
        # and no attention head can copy one of them. Started at unit scale, each keeps an identity of its own.
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=0.1)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def trunk(self, idx, attention_mask=None, cache=None):
        """Final hidden states (B, T, C). attention_mask (B, T): 1 on real tokens, 0 on (left) padding."""
        B, T = idx.shape
        if attention_mask is None and cache is None:  # full rows: positions 0..T-1 and SDPA's is_causal kernel
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
            pos, allowed = torch.arange(T, device=idx.device), None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            attention_mask = attention_mask.bool()
            pos = (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T) position = real tokens before
            key_mask = attention_mask
            if cache is not None:
                pos = pos + cache.next_position[:, None]
                cache.key_mask[:, cache.pos:cache.pos + T] = attention_mask
                key_mask = cache.key_mask[:, :cache.pos + T]
            if pos.max() >= self.config.block_size:
                raise ValueError(f"sequence of {int(pos.max()) + 1} tokens exceeds block_size {self.config.block_size}")
            allowed = attention_allowed(key_mask, T, self.config.causal)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, allowed, cache, layer)
        if cache is not None:
            cache.next_position += attention_mask.long().sum(1)
            cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, attention_mask=None):
        """logits (B, T, V); with targets (B, T) also the mean cross-entropy over targets != -1."""
        logits = self.lm_head(self.trunk(idx, attention_mask))  # (B, T, V)
        loss = None
        if targets is not None:
            # autocast runs cross_entropy in fp32 on CUDA; no fp32 copy of the (B, T, V) logits needed here
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, eos_token_id=None, use_cache=True, attention_mask=None):
        """Sample continuations of idx (B, P), left-padded where attention_mask is 0. temperature=0 is greedy.
        Returns (B, P + n) with n <= max_new_tokens; a row that has emitted EOS is padded with EOS after it."""
        B, P = idx.shape
        mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = None
        if use_cache:
            cache = KVCache(self.config, B, P + max_new_tokens, idx.device)
        step_input, step_mask = idx, mask
        for _ in range(max_new_tokens):
            if use_cache:  # the prefix once, then one new token per step
                h = self.trunk(step_input, step_mask, cache)
            else:  # recompute the whole sequence every step
                h = self.trunk(idx, mask)
            logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                next_id = torch.multinomial(F.softmax(logits / temperature, dim=-1), num_samples=1)  # (B, 1)
            if eos_token_id is not None:
                next_id = torch.where(done[:, None], torch.full_like(next_id, eos_token_id), next_id)
                done = done | (next_id[:, 0] == eos_token_id)
            idx = torch.cat([idx, next_id], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_id, dtype=torch.bool)], dim=1)
            step_input, step_mask = next_id, torch.ones_like(next_id, dtype=torch.bool)
            if eos_token_id is not None and bool(done.all()):
                break
        return idx


def token_logprobs(logits, targets):
    """log pi(targets[b, t] | context) for every position: logits (B, T, V), targets (B, T) -> (B, T)."""
    # log softmax(z)_y = z_y - logsumexp(z)
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(model, ids, labels):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over each row's response tokens: ids (B, T), labels (B, T) ->
    (B,). labels[b, t] is the token that follows ids[b, t], -1 on prompt and padding (data.example_tensors' layout).
    Padding is on the right, so a causal model's real positions never see it."""
    logits, _ = model(ids)  # (B, T, V)
    logprobs = token_logprobs(logits, labels.clamp(min=0))  # (B, T)
    return (logprobs * (labels != -1)).sum(1)  # (B,)


class ScalarHeadModel(nn.Module):
    """The GPT trunk with a linear head: one scalar per position (B, T). The reward model reads it at the last
    real token or as its mean over the response (config.readout, rm_scores); the PPO critic reads it at
    every response position."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gpt = GPT(config)
        self.head = nn.Linear(config.n_embd, 1)
        torch.nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_gpt(cls, gpt, readout="last"):
        """Initialise the trunk from a trained GPT (InstructGPT: the reward model starts from the SFT model)."""
        model = cls(dataclasses.replace(gpt.config, readout=readout))
        model.gpt.load_state_dict(gpt.state_dict())
        return model

    def forward(self, idx, attention_mask=None):
        return self.head(self.gpt.trunk(idx, attention_mask)).squeeze(-1).float()  # (B, T)


def rm_scores(rm, ids, attention_mask, response_start):
    """The score of each row (B,), as rm.config.readout says: the value at the last real token, or the mean over the
    response. ids, attention_mask (B, T); response_start: each row's first response column, (B,) or a number."""
    values = rm(ids, attention_mask)  # (B, T)
    if rm.config.readout == "last":
        last = attention_mask.size(1) - 1 - attention_mask.long().flip(1).argmax(1)  # (B,) last index where mask is 1
        return values.gather(1, last[:, None]).squeeze(1)
    columns = torch.arange(ids.size(1), device=ids.device)[None]  # (1, T)
    start = torch.as_tensor(response_start, device=ids.device).reshape(-1, 1)  # (B, 1) or (1, 1)
    response = attention_mask.bool() & (columns >= start)  # (B, T) the response's real tokens
    # r(x, y) = 1/|y| sum_{t in y} v_t
    return (values * response).sum(1) / response.sum(1)


# ----------------------------------------------------------------------------- the dtype a training step runs in

_CPU_FLAGS = read_text("/proc/cpuinfo").split() if os.path.exists("/proc/cpuinfo") else []
CPU_BF16 = [f for f in ("avx512_bf16", "amx_bf16") if f in _CPU_FLAGS]  # bf16 units (none listed: bf16 is emulated)


def train_dtype(device, choice="auto"):
    """--train_dtype resolved, "bfloat16" or "float32": auto is bfloat16 on CUDA and on a CPU with bf16 units, where
    a step of pretraining, SFT or the reward model is 1.4-2x faster. The CPU samples in float32 all the same, since
    its bf16 generation is slower (notebooks/experiments/benchmark.py --cpu_bf16=true measures both)."""
    bf16 = torch.device(device).type == "cuda" or (torch.device(device).type == "cpu" and bool(CPU_BF16))
    return ("bfloat16" if bf16 else "float32") if choice == "auto" else choice


def train_autocast(device, choice="auto"):
    """A supervised step's autocast; PPO and DPO train in sampling's (runs.autocast), to match its log-probs."""
    bf16 = train_dtype(device, choice) == "bfloat16"
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ----------------------------------------------------------------------------- checkpoints

KINDS = {"GPT": GPT, "ScalarHeadModel": ScalarHeadModel}


def save_checkpoint(path, model, **extra):
    """One plain dict {"model", "config", "kind", ...}, written through atomic_write: never half a checkpoint."""
    ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(model.config),
            "kind": type(model).__name__, **extra}
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


FIX = "delete it or rerun the stage that writes it"


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict {"model", "config", "kind", ...}; torch.load with weights_only=True, so a checkpoint can
    never run code. A file that is not one of our checkpoints is a CheckpointError, one line naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch's own message runs to several lines of advice: its type is enough here
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}); {FIX}") from None
    if not (isinstance(ckpt, dict) and {"model", "config", "kind"} <= ckpt.keys() and ckpt["kind"] in KINDS):
        raise CheckpointError(f"{path}: not a checkpoint of this project; {FIX}")
    return ckpt


def load_model(path, device="cpu"):
    """Rebuild the GPT or ScalarHeadModel a checkpoint holds."""
    ckpt = load_checkpoint(path)  # on the CPU: the model is built there and moved once
    try:  # a checkpoint of another version: config fields we do not know, or weights of other names or shapes
        model = KINDS[ckpt["kind"]](GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config or weights do not fit the model ({type(e).__name__}); {FIX}") \
            from None
    return model.to(device)
