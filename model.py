"""
A small GPT in plain PyTorch, the model every stage shares.

nanoGPT's architecture (Radford et al. 2019): learned position embeddings, pre-LayerNorm blocks, self-attention
through F.scaled_dot_product_attention, a GELU MLP. Departures:
  - the token embedding is not tied to the output layer and starts at unit scale (as in nanochat), so words the
    world uses in the same contexts keep embeddings of their own (see GPT.__init__).
  - `causal=False` runs the same blocks bidirectionally, for the masked-LM objective (BERT, Devlin et al. 2019).
  - `attention_mask` (B, T) lets left-padded prompts share a batch: pad keys are hidden and positions count real
    tokens only, so a padded row computes exactly what it would alone.
  - `generate` keeps a KV cache; `use_cache=False` recomputes the prefix every step (the readable version, and
    the test oracle for the cache).
  - `ScalarHeadModel` puts a linear head on the trunk: one number per position, for the reward model and critic.
Below the model, under one banner, the plumbing every script shares: checkpoints and files written atomically,
the device/autocast choice, data parallelism under torchrun (a share of each batch per process, gradients averaged,
rank 0 alone evaluating and writing), the `--field=value` parser (argparse, built from a Config) with its checks,
and the one-line errors of main().

Shapes: B batch, T time, C channels (n_embd), V vocab, nh heads, hs head size (C // nh),
        P prompt length, R response length.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import inspect
import math
import os
import re
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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
    readout: str = "last"  # a reward model's score (reward.rm_scores): the "last" real token's, or the "mean" over
    #                        the response's tokens; saved with the model, so an older reward model reads as it trained


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
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, config.causal

    def forward(self, x, allowed=None, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, T_k, hs): the cached prefix plus these T steps
        # softmax(q k^T / sqrt(hs)) v; with no mask to apply, SDPA's causal flag picks the flash kernel
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
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_token_id=None, use_cache=True,
                 attention_mask=None, pad_token_id=None):
        """Sample continuations of idx (B, P), left-padded where attention_mask is 0. temperature=0 is greedy.
        Returns (B, P + n) with n <= max_new_tokens; a row that has emitted EOS is padded after it."""
        B, P = idx.shape
        mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pad = eos_token_id if pad_token_id is None else pad_token_id
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
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            if eos_token_id is not None:
                next_id = torch.where(done[:, None], torch.full_like(next_id, pad), next_id)
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


class ScalarHeadModel(nn.Module):
    """The GPT trunk with a linear head: one scalar per position (B, T). The reward model reads it at the last
    real token or as its mean over the response (config.readout, reward.rm_scores); the PPO critic reads it at
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


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_mean_all_processes(x, mask):
    """masked_mean over the positions of every process under torchrun: the sums of x * mask and of mask, added up
    over the processes, then divided. Without a process group it is masked_mean itself."""
    if not distributed():
        return masked_mean(x, mask)
    mask = mask.to(x.dtype)
    total, count = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return total / count.clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the positions where mask is 1 (advantage whitening); under torchrun the mean and the
    variance are those of every process's positions, so each process scales its share as one process would."""
    mean = masked_mean_all_processes(x, mask)
    var = masked_mean_all_processes((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# =====================================================================================================================
# The model ends here. Below, the plumbing every script shares: checkpoints and files written atomically, the
# device and autocast, data parallelism under torchrun, the --field=value parser built from a Config, the rows of
# each script's check(cfg), and the one-line errors of main().
# =====================================================================================================================


# ----------------------------------------------------------------------------- files and checkpoints

@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """A file to write path's new content into: a temporary file next to path, renamed into place when the block
    ends and deleted if anything (Ctrl-C included) stops it first, so path is always the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block takes effect when the block ends, so the files it writes land together or not at all."""
    caught, main_thread = [], True
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # only the main thread receives signals and may set their handlers: nothing to defer
        main_thread = False
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or is not one of ours."""


KINDS = {"GPT": GPT, "ScalarHeadModel": ScalarHeadModel}
FIX = "delete it or rerun the stage that writes it"


def save_checkpoint(path, model, **extra):
    """One plain dict {"model", "config", "kind", ...}, written through atomic_write: never half a checkpoint."""
    ckpt = {"model": model.state_dict(), "config": dataclasses.asdict(model.config),
            "kind": type(model).__name__, **extra}
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict; torch.load with weights_only=True, so a checkpoint can never run code. A file that is
    not one of our checkpoints is a CheckpointError, one line naming the file."""
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


# ----------------------------------------------------------------------------- device, autocast, command line

def pick_device(name="auto"):
    """auto: CUDA, then Apple's GPU (MPS), then the CPU. Under torchrun "cuda" is the GPU of this process's
    LOCAL_RANK: one GPU a process."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


# autocast's dtype per device type: bf16 on CUDA, full fp32 on CPU (bf16 matmuls are slow on most CPUs); and
# AdamW's fused kernel, on CUDA. tests/test_cuda_path.py turns both on for the CPU: the CUDA path's numerics.
# Apple's GPU (MPS) runs the CPU's code: fp32, the plain AdamW, plain .to() (to_device pins for CUDA only).
AUTOCAST = {"cuda": torch.bfloat16, "cpu": None, "mps": None}
FUSED = {"cuda": True, "cpu": False, "mps": False}


def autocast(device):
    dtype = AUTOCAST.get(torch.device(device).type)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def nvidia_gpu_visible():
    """Is there an NVIDIA GPU on this machine, whether or not this torch can use it? (its driver's files)"""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def announce(cfg):
    """Every script's first line: the device, dtype and preset it picked; and one warning line when an NVIDIA GPU
    is visible but this torch cannot use it (the CPU build of PyTorch), instead of a quiet run on the CPU."""
    device = pick_device(cfg.device)
    dtype = str(AUTOCAST.get(torch.device(device).type) or torch.float32).replace("torch.", "")
    n = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    print(f"device {device} | dtype {dtype} | preset {cfg.preset} | torch {torch.__version__}"
          + (f" | processes {n}" if n > 1 else ""))
    if nvidia_gpu_visible() and not torch.cuda.is_available():
        print(f"warning: an NVIDIA GPU is visible but torch {torch.__version__} cannot use it; for the CUDA build: "
              f"pip install --force-reinstall torch=={torch.__version__.split('+')[0]}", file=sys.stderr)


def to_device(t, device):
    """Host -> device copy of a batch; on CUDA from pinned memory and asynchronous, so it overlaps compute."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- data parallelism under torchrun
# `torchrun --nproc_per_node=N script.py` starts N copies of a script and tells each its RANK (0..N-1), LOCAL_RANK
# (its GPU on this machine) and WORLD_SIZE (N) in its environment. Each process takes an equal share of every global
# batch (my_share), the gradients are averaged across the processes (average_gradients, in sft.optimizer_step), so
# their weights stay equal, and rank 0 alone evaluates (on_rank_0), prints and writes. Without torchrun there is no
# process group: distributed() is False, and every helper below returns its input or does nothing, so a plain
# `python script.py` computes exactly what it computed before any of this existed.

_alone = False  # True while rank 0 runs an on_rank_0 function by itself: in there it is one process on its own


def distributed():
    """Is this process one of several that torchrun started (and not inside an on_rank_0 function)?"""
    return dist.is_available() and dist.is_initialized() and not _alone


def rank():
    """This process's number: 0 without torchrun; torchrun's RANK, also before the process group exists."""
    return dist.get_rank() if distributed() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if distributed() else 1


@contextlib.contextmanager
def data_parallel(cfg, batch_field, multiple=1):
    """main()'s second wrapper. Under torchrun: the global batch --batch_field must split into WORLD_SIZE equal
    shares, each a multiple of `multiple` (one line from rank 0 before any work, if not); then the process group:
    NCCL with one GPU a process (LOCAL_RANK's) on CUDA, gloo elsewhere; and stdout for rank 0 alone (one log).
    Without torchrun, or with one process: nothing."""
    n = int(os.environ.get("WORLD_SIZE", 1))
    if n == 1:
        yield
        return
    size = getattr(cfg, batch_field)
    if size % (n * multiple):
        whole = f", a multiple of {multiple}" if multiple > 1 else ""
        raise stop(f"error: --{batch_field}={size}: must be a multiple of {n * multiple}, so that each of the {n} "
                   f"processes torchrun started takes an equal share{whole}")
    device = pick_device(cfg.device)
    cuda = device.startswith("cuda")
    joins = not dist.is_initialized()  # a caller may have joined already (tests/torchrun_driver.py does)
    if joins:
        if cuda:
            torch.cuda.set_device(device)
        # rank 0 evaluates alone while the others wait for its numbers: a long wait, not a hang
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=torch.device(device) if cuda else None)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    yield
    if joins:
        dist.destroy_process_group()


class ProcessLost(RuntimeError):
    """A collective failed: another process has died (gloo: "Connection closed by peer"). main() ends this process
    quietly; the one that failed has said why."""


def _collective(op, *args, **kwargs):
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:
        raise ProcessLost(str(e).splitlines()[0]) from None


def _flat_collective(tensors, op, *args):
    """op (an all-reduce, a broadcast) on all of tensors at once, flattened into one buffer where the backend wants
    it (the GPU for NCCL, the CPU for gloo), and copied back: one message, not one per tensor."""
    where = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([t.detach().flatten() for t in tensors]).to(where)
    _collective(op, flat, *args)
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def all_reduce_sum(tensor):
    """The sum of tensor over all processes (a new tensor); tensor itself without a process group."""
    if not distributed():
        return tensor
    total = tensor.clone()
    _flat_collective([total], dist.all_reduce)
    return total


def mean_over_processes(numbers):
    """{name: float} -> the mean of each over the processes, so a logged number means the whole global batch (the
    shares are equal); the dict itself without a process group."""
    if not distributed():
        return numbers
    total = all_reduce_sum(torch.tensor(list(numbers.values()), dtype=torch.float64))
    return dict(zip(numbers, (total / world_size()).tolist()))


def average_gradients(model):
    """Each process's gradient is that of the mean loss over its share; their mean over the N processes is the
    gradient of the global batch's mean loss when each share has as many terms (pretraining's tokens, the pairs of
    the reward model and DPO), and a mean of the shares' token means otherwise (SFT's and PPO's responses, MLM's
    masked tokens), as DistributedDataParallel computes it too. Nothing without a process group."""
    if distributed():
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # the same parameters in every process
        _flat_collective(grads, dist.all_reduce)  # the sum over the processes ...
        for g in grads:
            g.div_(world_size())  # ... over N: their mean


def same_start(model):
    """Every process takes rank 0's weights (as DistributedDataParallel does when it wraps a model): with the same
    averaged gradients they then stay equal. Nothing without a process group."""
    if distributed():
        _flat_collective(list(model.parameters()), dist.broadcast, 0)


def my_share(batch):
    """This process's rows of a global batch (a tensor, or a list): rank r of N takes the r-th of N equal parts.
    Every process draws the same global batch (the same seed), so the N shares together are one process's batch.
    Without a process group: the batch itself."""
    if not distributed():
        return batch
    n = world_size()
    if len(batch) % n:  # data_parallel checks the run's own batch; this, a stage the chain builds on the way
        raise ValueError(f"a batch of {len(batch)} does not split into {n} equal shares; build that stage first, "
                         f"with a batch size that is a multiple of {n}")
    k = len(batch) // n
    return batch[rank() * k:(rank() + 1) * k]


def barrier():
    """Wait until every process is here (after rank 0 has written what the others read next)."""
    if distributed():
        _collective(dist.barrier)


def on_rank_0(fn):
    """A decorator: fn computed by rank 0 alone and its result sent to every process, the others waiting for it.
    Evaluation goes through it, so rank 0 samples with one process's seeds and every process gets one process's
    numbers. Inside fn, rank 0 is one process on its own (distributed() is False), so fn may call any helper here,
    or another on_rank_0 function. Without a process group: fn itself."""
    @functools.wraps(fn)
    def computed_by_rank_0(*args, **kwargs):
        global _alone
        if not distributed():
            return fn(*args, **kwargs)
        result = [None]
        if rank() == 0:
            _alone = True
            try:
                result[0] = fn(*args, **kwargs)
            finally:
                _alone = False
        _collective(dist.broadcast_object_list, result, src=0)
        return result[0]
    return computed_by_rank_0


def stop(message):
    """The SystemExit of a mistake every process meets alike (a bad flag; a diverged run, since check_finite sees
    every process's numbers): rank 0 prints its line, the others leave without a word and with status 0, so that
    torchrun, which ends all processes once one fails, does not end rank 0 before its line is out."""
    return SystemExit(message if rank() == 0 else 0)


TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def flag_type(name, default):
    """argparse's type= for the field name: the default's type (true/false, yes/no or 1/0 for a bool), and a bad
    value ends the program with one line naming the flag."""
    kind = type(default)

    def convert(text):
        try:
            if kind is bool and text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
        except ValueError:
            raise stop(f"error: --{name}={text}: must be {TYPE_WORDS[kind]}") from None
    return convert


class OneLineParser(argparse.ArgumentParser):
    """argparse, with every mistake in one line ("error: --n_layer needs a value") instead of usage and a message."""

    def error(self, message):
        flag = message.split("argument ", 1)[-1].split(":")[0]
        raise stop(f"error: {flag} needs a value" if "expected one argument" in message else f"error: {message}")


def resolve_preset(preset):
    """--preset=auto is "medium" where CUDA is available, else "small"; any other name is itself."""
    return ("medium" if torch.cuda.is_available() else "small") if preset == "auto" else preset


def parse_config(cls, argv=None, presets=None, check=None, quiet=False):
    """A Config from `--field=value` / `--field value` flags: an argparse parser built from the dataclass, one flag
    per field. `presets` maps a preset name to field overrides (`--preset=auto` picks "medium" when CUDA is
    available, else "small"); explicit flags win over the preset. `check(cfg)` yields the script's (field, ok,
    allowed) rows; the first row that fails ends the program with one line, before any work and before the
    overrides are printed (unless quiet). Under torchrun, rank 0 alone prints them, and the mistake (stop)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = quiet or rank() > 0
    fields = dataclasses.fields(cls)
    if "-h" in argv or "--help" in argv:  # the Config itself is the help: each field, its default, its docstring
        print(f"usage: python {os.path.basename(sys.argv[0])} [--field=value ...], the fields of\n\n"
              f"{inspect.getsource(cls)}"
              + (f"\npresets (--preset=auto: medium on CUDA): {presets}" if presets else ""))
        raise SystemExit(0)
    parser = OneLineParser(add_help=False, allow_abbrev=False)
    for f in fields:  # only the flags given land in the namespace: the rest keep the preset's or the default
        parser.add_argument(f"--{f.name}", type=flag_type(f.name, f.default), default=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not rest[0].startswith("--"):
            raise stop(f"error: unexpected argument {rest[0]!r}; flags look like --field=value")
        valid = ", ".join(f"--{f.name}" for f in fields)
        raise stop(f"error: unknown flag {rest[0].split('=')[0]}; valid flags: {valid}")
    overrides = vars(args)
    cfg = cls()
    if presets and hasattr(cfg, "preset"):
        preset = resolve_preset(overrides.get("preset", cfg.preset))
        if preset not in presets:
            raise stop(f"error: --preset={preset}: must be one of auto, {', '.join(presets)}")
        cfg = dataclasses.replace(cfg, **presets[preset], preset=preset)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k != "preset"})
    for field, ok, allowed in check(cfg) if check else ():
        if not ok:
            raise stop(f"error: --{field}={getattr(cfg, field)}: must be {allowed}")
    if not quiet and hasattr(cfg, "device"):
        announce(cfg)
    for key, value in {} if quiet else overrides.items():
        print(f"override: {key} = {value!r}")
    return cfg


# ----------------------------------------------------------------------------- rows for the scripts' check(cfg)
# Each script's check(cfg), under its Config, yields one (field, ok, allowed) row per rule. parse_config stops at the
# first row that fails, so a row may rely on the rows above it (n_embd % n_head needs n_head > 0 first).

def positive(cfg, *fields):
    for f in fields:
        yield f, 0 < getattr(cfg, f) < math.inf, "> 0"


def non_negative(cfg, *fields):
    for f in fields:
        yield f, 0 <= getattr(cfg, f) < math.inf, ">= 0"


def interval(cfg, field, spec):
    """A row: field lies in spec, written as in mathematics: "[0, 1)" includes 0 and excludes 1."""
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    v = getattr(cfg, field)
    ok = (lo <= v if spec[0] == "[" else lo < v) and (v <= hi if spec[-1] == "]" else v < hi)
    return field, ok, f"in {spec}"


def one_of(cfg, field, *choices):
    return field, getattr(cfg, field) in choices, f"one of {', '.join(choices)}"


def files_or_empty(cfg, *fields):
    for f in fields:
        yield f, not getattr(cfg, f) or os.path.isfile(getattr(cfg, f)), "an existing file, or empty"


def writable(path):
    """Whether path is a folder we can write in, or can make: the nearest folder on its way that exists is writable."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def device_exists(name):
    if name in ("auto", "cpu"):
        return True
    if name == "mps":
        return torch.backends.mps.is_available()
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    return bool(cuda) and torch.cuda.is_available() and int(cuda.group(1) or 0) < torch.cuda.device_count()


def run_fields(cfg):
    """Rows for out_dir, device and seed, which every script has (preset is checked while parse_config applies it)."""
    yield "out_dir", bool(cfg.out_dir) and writable(cfg.out_dir), "a folder we can write in, or make"
    yield "device", device_exists(cfg.device), "auto, cpu, mps where Apple's GPU is, or cuda[:i] where CUDA has it"
    if hasattr(cfg, "seed"):
        yield "seed", 0 <= cfg.seed < 2 ** 63, "in [0, 2**63)"


# ----------------------------------------------------------------------------- errors main() reports in one line

class Diverged(RuntimeError):
    """A loss or reward became nan or inf: the stage stops, and writes nothing from the diverged model."""


def check_finite(step, **values):
    """Raise Diverged ("step 12: loss is nan") when one of the named numbers or tensors holds a nan or inf. Under
    torchrun each process's first bad number (0 if none) is added up over the processes: every process sees every
    process's numbers, so all stop at the same step, or none does."""
    first_bad = {}
    for name, value in values.items():
        value = torch.as_tensor(value).detach()
        bad = value[~torch.isfinite(value)]
        first_bad[name] = bad.flatten()[0].item() if len(bad) else 0.0
    if distributed():
        total = all_reduce_sum(torch.tensor(list(first_bad.values()), dtype=torch.float64))
        first_bad = dict(zip(first_bad, total.tolist()))
    for name, value in first_bad.items():
        if not math.isfinite(value):
            raise Diverged(f"step {step}: {name} is {value}")


@contextlib.contextmanager
def one_line_errors():
    """main()'s wrapper: what a user can cause (a bad file, a diverged run, a checkpoint to delete, Ctrl-C) ends the
    program with one line on stderr and a non-zero exit status instead of a traceback. Under torchrun the process
    that fails prints its line (rank 0 alone, for what all processes meet alike), and one whose partner has died
    ends without a word: torchrun ends them all."""
    try:
        yield
    except Diverged as e:
        raise stop(f"error: {e}; nothing was written") from None
    except (ValueError, OSError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except ProcessLost:
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if rank() == 0:
            print("interrupted; nothing half-written", file=sys.stderr)
        raise SystemExit(130) from None
