"""
How fast is our code, and where does the time of one PPO iteration go? A script, not a test: pytest's default
patterns collect test_*.py and *_test.py files only, and nothing here is named test_*.

  1. pretraining      tokens/s of the full pretraining step (batch -> device, forward, backward, clip, AdamW) and
                      model FLOPs utilisation, MFU = (FLOPs per token * tokens/s) / peak, with
                      FLOPs per token = 6 N + 12 L T C              (Chowdhery et al. 2022, PaLM, appendix B)
                      N parameters (position embeddings excluded), L layers, T context, C width.
  2. generation       GPT.generate with the KV cache against recomputing the prefix every step.
  3. training step    forward + backward + AdamW of our GPT against ReferenceGPT below, the plainest causal
                      transformer of the same shape and weights (no padding mask, no cache, SDPA is_causal).
                      The target is ours / reference <= 1.1: what padding and caching support costs.
  4. one PPO iteration of ppo.rollout + ppo.ppo_step on fresh models at ppo.py's preset sizes, split into
                      rollout (generation), scoring (policy, reference, critic and reward-model forward passes) and
                      update (the PPO epochs), with the peak memory. Skipped if ppo.py is missing.
  5. N processes      with --processes=N, instead of 1-4: sft.py's pretraining of the medium preset's model as N
                      torchrun CPU processes (gloo, one thread each) against one process (one thread), the same
                      global batch of --batch_size windows, the runs taking turns; the ratio of their step times.
  6. bf16 on the CPU  with --cpu_bf16=true, instead of 1-4: the small model's pretraining step and its cached
                      generation under torch.autocast("cpu", bfloat16) against fp32, taking turns; the ratio says
                      what the CPU's bf16 units (avx512_bf16, amx_bf16 in /proc/cpuinfo) buy the chain: where it
                      has them, pretraining's, SFT's and the reward model's steps run in bf16 (model.train_dtype).
  7. the levers      with --levers=true, instead of 1-4: each speed lever the chain keeps against what it replaced,
                      side by side on the small model: a pretraining step in bf16 against fp32 (section 6's); an
                      SFT step of 32 demonstrations grouped by length (sft.length_grouped) against 32 at random; the
                      reward model's time a pair trained on, 2 prompts a step with all their pairs
                      (reward.train_reward_model, its setup included) against 8 pairs at random, 16 rows a step.

On CPU it runs the small shape (the small preset's model) in fp32; on CUDA also GPT-2 small (124M) in bf16 with
fused AdamW, and --compile wraps both training-step models in torch.compile. The GPT-2 small rows have never been
measured by us (no GPU was lent while this was written): they are there for users with a GPU. Times are medians
over --repeats runs after --warmup runs, with torch.cuda.synchronize around each on CUDA. On a shared machine the
numbers are noisy: compare ratios measured in one run, not absolute numbers across runs. On CPU it uses one thread
by default (--threads).

Run:  python notebooks/experiments/benchmark.py                   (CPU: about a minute)
      python notebooks/experiments/benchmark.py --compile=true    (CUDA)
      python notebooks/experiments/benchmark.py --processes=2     (2 CPU processes against 1: a few minutes)
      python notebooks/experiments/benchmark.py --cpu_bf16=true   (bf16 autocast against fp32 on the CPU: a minute)
      python notebooks/experiments/benchmark.py --levers=true     (the chain's speed levers: a few minutes)
"""
import contextlib
import dataclasses
import io
import itertools
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, ROOT)
import data  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import stages  # noqa: E402
from model import CPU_BF16, GPT, GPTConfig, ScalarHeadModel, rm_scores, train_autocast, train_dtype  # noqa: E402
from runs import atomic_write, autocast, parse_config, pick_device, to_device  # noqa: E402

PROCESSES_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures", "processes.json")


@dataclass
class Config:
    preset: str = "auto"
    """small (the CPU's), medium (also GPT-2 small, for a GPU), or auto (medium when CUDA is available)"""
    device: str = "auto"
    """cpu, cuda, or auto"""
    shapes: str = "small"
    """comma-separated model shapes to benchmark: small (the small preset's model), gpt2 (124M)"""
    batch_size: int = 8
    """sequences per training step (each block_size tokens long)"""
    gen_batch: int = 8
    """prompts generated in parallel"""
    prompt_len: int = 32
    """P, tokens of each prompt"""
    gen_tokens: int = 224
    """R, new tokens generated per prompt (block_size is raised to P + R for the generation benchmark if needed)"""
    warmup: int = 2
    """untimed runs before timing"""
    repeats: int = 5
    """timed runs; the median is reported"""
    compile: bool = False
    """torch.compile the models of the training-step benchmarks (sections 1 and 3)"""
    peak_tflops: float = 0.0
    """the peak MFU is measured against, in TFLOP/s; 0: look the GPU up in PEAK_BF16_TFLOPS (CPU: no MFU)"""
    ppo: bool = True
    """time one PPO iteration (needs ppo.py)"""
    threads: int = 1
    """CPU only: torch.set_num_threads. On a small, shared CPU one thread is several times faster for this small
    model (threads that wait for each other's time slices stall every small op); 0 keeps torch's default"""
    processes: int = 0
    """N > 1: only section 5, N torchrun CPU processes against one (medians of --repeats runs of each, every run
    --warmup steps and 8 timed ones)"""
    cpu_bf16: bool = False
    """only section 6: bf16 autocast against fp32 on the CPU, the small model's training step and generation"""
    levers: bool = False
    """only section 7: each speed lever the chain keeps (bf16 steps, SFT length groups, reward-model batches by
    prompt) against what it replaced"""
    seed: int = 0


PRESETS = {"small": {}, "medium": dict(shapes="small,gpt2", batch_size=16, gen_batch=32, gen_tokens=512, warmup=3,
                                        repeats=10)}

SHAPES = {"small": dict(n_layer=4, n_head=4, n_embd=128, block_size=192, vocab_size=data.VOCAB_SIZE),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)}

# dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s; the first name contained in the device
# name wins, so the PCIe H100 comes before the SXM one
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0)]


# ----------------------------------------------------------------------------- the reference model

class ReferenceGPT(nn.Module):
    """The simplest causal GPT with our architecture and parameter names (so it loads our state_dict): every row
    is a full unpadded sequence, attention is SDPA with is_causal=True, positions are 0..T-1."""

    def __init__(self, config):
        super().__init__()
        C, self.n_head = config.n_embd, config.n_head
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, C), wpe=nn.Embedding(config.block_size, C),
            h=nn.ModuleList([nn.ModuleDict(dict(
                ln_1=nn.LayerNorm(C, bias=config.bias),
                attn=nn.ModuleDict(dict(c_attn=nn.Linear(C, 3 * C, bias=config.bias),
                                        c_proj=nn.Linear(C, C, bias=config.bias))),
                ln_2=nn.LayerNorm(C, bias=config.bias),
                mlp=nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C, bias=config.bias),
                                       c_proj=nn.Linear(4 * C, C, bias=config.bias))),
            )) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(C, bias=config.bias)))
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.transformer.h:
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.size(-1), dim=2)  # (B, T, C) each
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + block.attn.c_proj(y)
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# ----------------------------------------------------------------------------- timing

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_times(fns, device, warmup, repeats):
    """Median seconds of each fn in fns; the fns take turns in every round, so load on a shared machine hits
    them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def peak_tflops(cfg, device):
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops, f"--peak_tflops={cfg.peak_tflops:g}"
    if not str(device).startswith("cuda"):
        return None, "cpu"
    name = torch.cuda.get_device_name()
    return next(((p, name) for key, p in PEAK_BF16_TFLOPS if key in name), (None, name))


def flops_per_token(model):
    """6 N + 12 L T C: forward + backward of the matmuls (6 N) and of attention's q k^T and att v (12 L T C)."""
    c = model.config
    return 6 * model.num_params() + 12 * c.n_layer * c.block_size * c.n_embd


def max_memory(device):
    if str(device).startswith("cuda"):
        return f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    # Linux reports ru_maxrss in KiB; it is the process's high-water mark, earlier sections included
    return f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (process lifetime)"


def row(*cells):
    print(" | ".join(f"{c:>14}" if i else f"{c:<26}" for i, c in enumerate(cells)))


def maybe_compile(model, cfg):
    return torch.compile(model) if cfg.compile else model


# ----------------------------------------------------------------------------- 1. pretraining tokens/s and MFU

def bench_pretrain(gcfg, cfg, device):
    model = GPT(gcfg).to(device)
    step_model = maybe_compile(model, cfg)
    optimizer = stages.make_optimizer(model, 1e-4, 0.1, device)
    stream = torch.randint(gcfg.vocab_size, (100 * gcfg.block_size,))  # a random token stream stands in for text
    rng = torch.Generator().manual_seed(cfg.seed)

    def step():  # sft.pretrain's step
        x, y = data.lm_batch(stream, gcfg.block_size, cfg.batch_size, rng)  # (B, T), (B, T)
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device):
            _, loss = step_model(x, y)
        stages.optimizer_step(model, optimizer, loss, 1e-4)

    (dt,) = median_times([step], device, cfg.warmup, cfg.repeats)
    tokens_per_s = cfg.batch_size * gcfg.block_size / dt
    achieved = flops_per_token(model) * tokens_per_s / 1e12  # TFLOP/s
    peak, against = peak_tflops(cfg, device)
    mfu = f"{100 * achieved / peak:.1f}% of {peak:g}" if peak else f"n/a ({against})"
    return dict(step_ms=1000 * dt, tokens_per_s=tokens_per_s, tflops=achieved, mfu=mfu)


# ----------------------------------------------------------------------------- 2. generation with and without cache

def bench_generate(gcfg, cfg, device):
    need = cfg.prompt_len + cfg.gen_tokens
    if need > gcfg.block_size:
        gcfg = GPTConfig(**{**gcfg.__dict__, "block_size": need})
    model = GPT(gcfg).to(device).eval()
    prompts = torch.randint(gcfg.vocab_size, (cfg.gen_batch, cfg.prompt_len), device=device)  # (B, P)

    def gen(use_cache, n):
        with autocast(device):  # no eos_token_id: every row generates exactly n tokens
            model.generate(prompts, n, temperature=1.0, use_cache=use_cache)

    for _ in range(cfg.warmup):  # warm up on short generations; a full uncached one takes long enough
        gen(True, 16)
        gen(False, 16)
    # the uncached run is hundreds of full forward passes, long enough to time once
    (cached,) = median_times([lambda: gen(True, cfg.gen_tokens)], device, 0, cfg.repeats)
    (recomputed,) = median_times([lambda: gen(False, cfg.gen_tokens)], device, 0, 1)
    tokens = cfg.gen_batch * cfg.gen_tokens
    return dict(cached=tokens / cached, recomputed=tokens / recomputed, speedup=recomputed / cached,
                block_size=gcfg.block_size)


# ----------------------------------------------------------------------------- 3. our training step vs the reference

def bench_train_step(gcfg, cfg, device):
    ours = GPT(gcfg).to(device)
    ref = ReferenceGPT(gcfg).to(device)
    ref.load_state_dict(ours.state_dict())  # the same weights, so the same function
    x = torch.randint(gcfg.vocab_size, (cfg.batch_size, gcfg.block_size), device=device)  # (B, T)
    y = torch.randint(gcfg.vocab_size, (cfg.batch_size, gcfg.block_size), device=device)  # (B, T)
    with torch.no_grad(), autocast(device):
        diff = (ours(x)[0].float() - ref(x, y)[0].float()).abs().max().item()

    def stepper(model):
        step_model = maybe_compile(model, cfg)
        optimizer = stages.make_optimizer(model, 1e-4, 0.1, device)

        def step():  # forward, backward, AdamW: nothing else
            with autocast(device):
                _, loss = step_model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    t_ours, t_ref = median_times([stepper(ours), stepper(ref)], device, cfg.warmup, cfg.repeats)
    return dict(ours_ms=1000 * t_ours, ref_ms=1000 * t_ref, ratio=t_ours / t_ref, max_logit_diff=diff)


# ----------------------------------------------------------------------------- 6. bf16 autocast on the CPU

def bench_cpu_bf16(gcfg, cfg):
    """{fp32 and bf16 ms of a pretraining step, of a cached generation}: the same model and batch, taking turns."""
    model = GPT(gcfg)
    optimizer = stages.make_optimizer(model, 1e-4, 0.1, "cpu")
    x = torch.randint(gcfg.vocab_size, (cfg.batch_size, gcfg.block_size))  # (B, T)
    prompts = torch.randint(gcfg.vocab_size, (cfg.gen_batch, cfg.prompt_len))  # (B, P)
    new = min(cfg.gen_tokens, gcfg.block_size - cfg.prompt_len)

    def under(bf16, fn):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                fn()
        return run

    def step():
        _, loss = model(x, x)
        stages.optimizer_step(model, optimizer, loss, 1e-4)

    def generate():
        with torch.no_grad():
            model.generate(prompts, new, temperature=1.0)

    out = {}
    for name, fn in (("step", step), ("generate", generate)):
        fp32, bf16 = median_times([under(False, fn), under(True, fn)], "cpu", cfg.warmup, cfg.repeats)
        out[name] = (1000 * fp32, 1000 * bf16)
    return out


# ----------------------------------------------------------------------------- 7. the chain's levers, side by side

def story_pairs(n_prompts, seed):
    """Pairs shaped as the chain's (4 responses a prompt, all 6 pairs of them and each against its retold twin),
    from demonstrations instead of SFT samples, labelled at random: the shapes, not the labels, set the time."""
    rng, pairs = random.Random(seed), []
    for instruction, input_ in data.tasks("train", n_prompts, seed=seed):
        prompt = data.alpaca_prompt(instruction, input_)
        own = [data.demonstration(rng, instruction, input_) for _ in range(4)]
        twins = [(a, reward.retold(prompt, a, rng)) for a in own]
        for a, b in list(itertools.combinations(own, 2)) + [(a, b) for a, b in twins if a != b]:
            pairs.append({"prompt": prompt, "chosen": a, "rejected": b, "margin": 0.0})
    return pairs


def bench_levers(gcfg, cfg, steps=5):
    """{lever: (ms before, ms after, the unit)}: each lever the chain keeps against what it replaced, on the small
    model, taking turns; the SFT and reward-model steps run at this CPU's --train_dtype=auto, as the chain does."""
    dtype, rng = train_dtype("cpu"), torch.Generator().manual_seed(cfg.seed)
    model = GPT(gcfg)
    rm = ScalarHeadModel.from_gpt(model)
    optimizers = {id(m): stages.make_optimizer(m, 1e-4, 0.1, "cpu") for m in (model, rm)}
    examples = data.sft_tensors(data.sft_examples(4000, seed=cfg.seed), gcfg.block_size)
    grouped = sft.length_grouped([len(e[0]) for e in examples], 32, rng)
    pairs = story_pairs(200, cfg.seed)

    def steps_of(m, loss_fn, dtype_):  # `steps` training steps of m on loss_fn()
        def run():
            for _ in range(steps):
                with train_autocast("cpu", dtype_):
                    loss = loss_fn()
                stages.optimizer_step(m, optimizers[id(m)], loss, 1e-4)
        return run

    def sft_loss(draw):
        ids, labels = sft.sft_batch(examples, 32, rng, "cpu", draw())
        return sft.sft_loss(model(ids)[0], labels)

    def pairs_at_random():  # the reward model's step before: 8 pairs drawn at random, two rows each
        batch = [pairs[i] for i in torch.randint(len(pairs), (8,), generator=rng)]
        ids, mask, starts = sft.tokenize_responses([p["prompt"] for p in batch] * 2,
                                                   [p["chosen"] for p in batch] + [p["rejected"] for p in batch])
        return reward.preference_loss(*rm_scores(rm, ids, mask, starts).chunk(2))

    def by_prompt():  # today's: reward.train_reward_model, 2 prompts a step, each response once, all their pairs
        with contextlib.redirect_stdout(io.StringIO()):  # its log line a step
            reward.train_reward_model(rm, pairs, reward.Config(steps=steps, twin_steps=0, batch_size=2,
                                                               seed=int(torch.randint(2 ** 31, (1,)))), "cpu")

    at_random = lambda: torch.randint(len(examples), (32,), generator=rng)  # noqa: E731
    groups = reward.by_prompt(pairs)
    pairs_a_prompt = sum(len(c) for _, _, c in groups) / len(groups)
    fp32, bf16 = bench_cpu_bf16(gcfg, cfg)["step"]  # section 6's pretraining step, in ms
    out = {"pretraining step: bf16 autocast": (fp32 / 1000, bf16 / 1000, "step")}
    a, b = median_times([steps_of(model, lambda: sft_loss(at_random), dtype),
                         steps_of(model, lambda: sft_loss(lambda: next(grouped)), dtype)], "cpu", cfg.warmup,
                        cfg.repeats)
    out["SFT: batches grouped by length"] = (a / steps, b / steps, "step of 32")
    a, b = median_times([steps_of(rm, pairs_at_random, dtype), by_prompt], "cpu", cfg.warmup, cfg.repeats)
    out["reward model: batches by prompt"] = (a / (8 * steps), b / (2 * pairs_a_prompt * steps), "pair")
    return out


# ----------------------------------------------------------------------------- 4. one PPO iteration

def bench_ppo(gcfg, cfg, device, ppo):
    """ppo.rollout and ppo.ppo_step on freshly initialised models of this shape, with ppo.py's preset sizes.
    rollout = generation (step 1, timed by wrapping the policy's generate) + scoring (steps 2-5: the policy,
    reference, critic and reward-model forward passes); update = ppo_step's epochs of minibatch steps."""
    preset = "medium" if str(device).startswith("cuda") else "small"
    pcfg = dataclasses.replace(ppo.Config(), **ppo.PRESETS[preset], preset=preset, device=str(device))
    gcfg = GPTConfig(**{**gcfg.__dict__, "block_size": max(gcfg.block_size, 128 + pcfg.max_new_tokens)})
    policy = GPT(gcfg).to(device).eval()
    ref = GPT(gcfg).to(device).requires_grad_(False).eval()
    ref.load_state_dict(policy.state_dict())
    critic = ScalarHeadModel.from_gpt(policy).to(device).eval()
    rm = ScalarHeadModel.from_gpt(policy).to(device).requires_grad_(False).eval()
    reward_fn = ppo.rm_reward_fn(rm)
    policy_opt = stages.make_optimizer(policy, pcfg.lr, 0.0, device)
    critic_opt = stages.make_optimizer(critic, pcfg.critic_lr, 0.0, device)
    prompts = [data.alpaca_prompt(i, x) for i, x in data.tasks("train", pcfg.batch_size, seed=cfg.seed)]
    prompt_ids = [torch.tensor(data.encode(p)) for p in prompts]
    gen = torch.Generator().manual_seed(cfg.seed)

    generate, gen_seconds = policy.generate, []

    def timed_generate(*args, **kwargs):  # an instance attribute shadows GPT.generate inside ppo.rollout
        sync(device)
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        sync(device)
        gen_seconds.append(time.perf_counter() - t0)
        return out
    policy.generate = timed_generate

    def iteration():
        batch = ppo.rollout(policy, ref, critic, reward_fn, prompt_ids, pcfg.max_new_tokens, pcfg.kl_coef,
                            pcfg.no_eos_penalty, device)
        sync(device)
        t_update = time.perf_counter()
        ppo.ppo_step(policy, critic, policy_opt, critic_opt, batch, pcfg, gen)
        sync(device)
        return t_update, batch["response"].size(1)

    iteration()  # warm-up
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    phases = []
    for _ in range(max(1, cfg.repeats // 3)):
        sync(device)
        t0 = time.perf_counter()
        t_update, R = iteration()
        t1 = time.perf_counter()
        phases.append((gen_seconds[-1], t_update - t0 - gen_seconds[-1], t1 - t_update))
    rollout_s, scoring_s, update_s = (statistics.median(p) for p in zip(*phases))
    return dict(rollout=rollout_s, scoring=scoring_s, update=update_s, B=pcfg.batch_size, R=R,
                epochs=pcfg.n_epochs, minibatches=pcfg.n_minibatches, memory=max_memory(device))


# ----------------------------------------------------------------------------- 5. N processes against one

def bench_processes(cfg):
    """sft.py --stage=pretrain --preset=medium as cfg.processes torchrun processes and as one plain process, in
    turns, cfg.repeats runs each. A step's time is the one stages.log prints (rank 0's, the gradients' all-reduce
    included); the median over every run's steps after the first cfg.warmup. Returns (ms one, ms N, parameters)."""
    flags = ["--stage=pretrain", "--preset=medium", "--device=cpu", "--n_docs=1000", f"--seed={cfg.seed}",
             f"--pretrain_steps={cfg.warmup + 8}", f"--pretrain_batch_size={cfg.batch_size}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.processes}"]
    times = {1: [], cfg.processes: []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(cfg.repeats):
            for n, launch in ((1, [sys.executable]), (cfg.processes, torchrun)):
                run = subprocess.run([*launch, "sft.py", *flags, f"--out_dir={out}/{n}"], cwd=ROOT, text=True,
                                     capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if run.returncode:
                    raise SystemExit(f"error: {n} process(es): {run.stderr.strip().splitlines()[-1]}")
                steps = re.findall(r"^step (\d+) \|.* \| ms (\d+)$", run.stdout, re.M)
                times[n] += [int(ms) for step, ms in steps if int(step) >= cfg.warmup]
        params = re.search(r"pretraining \(clm\) ([\d.]+M) parameters", run.stdout).group(1)
    return statistics.median(times[1]), statistics.median(times[cfg.processes]), params


# ----------------------------------------------------------------------------- main

def main():
    cfg = parse_config(Config, presets=PRESETS)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    shapes = [s.strip() for s in cfg.shapes.split(",") if s.strip()]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"error: --shapes: unknown shape {s!r}; valid: {', '.join(SHAPES)}")
    if str(device).startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        where = f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"benchmark on {where}, torch {torch.__version__}, "
          f"{'bf16 autocast, fused AdamW' if str(device).startswith('cuda') else 'fp32'}"
          f"{', torch.compile' if cfg.compile else ''}; medians of {cfg.repeats} after {cfg.warmup} warm-up")
    if cfg.processes > 1:
        n, T = cfg.processes, sft.Config().block_size
        print(f"\n5. sft.py's pretraining step, medium preset (B={cfg.batch_size} windows of {T} tokens, split "
              f"across the processes), one thread a process; medians of {cfg.repeats} runs of 8 steps each")
        one, many, params = bench_processes(cfg)
        row("", "1 process", f"{n} processes")
        row(f"step ms ({params} params)", f"{one:.0f}", f"{many:.0f}")
        row("tokens/s", f"{cfg.batch_size * T / one * 1000:,.0f}", f"{cfg.batch_size * T / many * 1000:,.0f}")
        row(f"speed-up of {n} processes", "", f"{one / many:.2f}x")
        # the README's line on it is rendered from this record by notebooks/experiments/results.py, never typed
        record = dict(processes=n, params=params, ms_one=one, ms_many=many, speedup=one / many,
                      load=round(os.getloadavg()[0], 1), machine=f"{os.cpu_count()} cores, torch {torch.__version__}")
        with atomic_write(PROCESSES_RECORD) as f:
            json.dump(record, f, indent=1)
        print(f"wrote {PROCESSES_RECORD}")
        return
    if cfg.levers:
        print(f"\n7. the chain's levers against what each replaced, the small model, training steps in "
              f"{train_dtype('cpu')} (bf16 units: {', '.join(CPU_BF16) or 'none'}); ms per unit, medians")
        print(f"{'':<48} | {'before ms':>10} | {'after ms':>10} | {'speed-up':>8}")
        for name, (before, after, unit) in bench_levers(GPTConfig(**SHAPES["small"]), cfg).items():
            print(f"{f'{name} (a {unit})':<48} | {1000 * before:>10.1f} | {1000 * after:>10.1f} | "
                  f"{before / after:>7.2f}x")
        return
    if cfg.cpu_bf16:
        units = CPU_BF16
        print(f"\n6. bf16 autocast against fp32 on the CPU, the small model (B={cfg.batch_size} windows; generation "
              f"B={cfg.gen_batch}, cached); bf16 units: {', '.join(units) or 'none listed in /proc/cpuinfo'}")
        res = bench_cpu_bf16(GPTConfig(**SHAPES["small"]), cfg)
        row("", "fp32 ms", "bf16 ms", "fp32 / bf16")
        for name, (fp32, bf16) in res.items():
            row(name, f"{fp32:.0f}", f"{bf16:.0f}", f"{fp32 / bf16:.2f}x")
        return
    gcfgs = {s: GPTConfig(**SHAPES[s]) for s in shapes}
    params = {s: GPT(g).num_params() for s, g in gcfgs.items()}
    row("", *(f"{s} ({params[s] / 1e6:.1f}M)" for s in shapes))

    print(f"\n1. pretraining step (B={cfg.batch_size}, T=block_size)")
    res = [bench_pretrain(gcfgs[s], cfg, device) for s in shapes]
    row("step ms", *(f"{r['step_ms']:.1f}" for r in res))
    row("tokens/s", *(f"{r['tokens_per_s']:,.0f}" for r in res))
    row("achieved TFLOP/s", *(f"{r['tflops']:.3f}" for r in res))
    row("MFU", *(r["mfu"] for r in res))

    print(f"\n2. generation (B={cfg.gen_batch}, P={cfg.prompt_len}, R={cfg.gen_tokens} new tokens)")
    res = [bench_generate(gcfgs[s], cfg, device) for s in shapes]
    row("block_size used", *(str(r["block_size"]) for r in res))
    row("tokens/s, KV cache", *(f"{r['cached']:,.0f}" for r in res))
    row("tokens/s, recompute", *(f"{r['recomputed']:,.0f}" for r in res))
    row("cache speed-up", *(f"{r['speedup']:.1f}x" for r in res))

    print(f"\n3. training step: ours vs ReferenceGPT (B={cfg.batch_size}, T=block_size; target ratio <= 1.1)")
    res = [bench_train_step(gcfgs[s], cfg, device) for s in shapes]
    row("ours ms", *(f"{r['ours_ms']:.1f}" for r in res))
    row("reference ms", *(f"{r['ref_ms']:.1f}" for r in res))
    row("ours / reference", *(f"{r['ratio']:.3f}" for r in res))
    row("max |logit diff|", *(f"{r['max_logit_diff']:.1e}" for r in res))

    if not cfg.ppo:
        return
    print("\n4. one PPO iteration (ppo.py's preset sizes; fresh models of each shape)")
    try:
        import ppo
    except ImportError as e:
        print(f"ppo.py not available ({e}): skipped")
        return
    res = [bench_ppo(gcfgs[s], cfg, device, ppo) for s in shapes]
    row("rollouts x response len", *(f"{r['B']} x {r['R']}" for r in res))
    row("epochs x minibatches", *(f"{r['epochs']} x {r['minibatches']}" for r in res))
    row("rollout (generate) s", *(f"{r['rollout']:.2f}" for r in res))
    row("scoring (4 forwards) s", *(f"{r['scoring']:.2f}" for r in res))
    row("update s", *(f"{r['update']:.2f}" for r in res))
    for s, r in zip(shapes, res):
        print(f"{s}: {r['memory']}")


if __name__ == "__main__":
    main()
