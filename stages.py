"""
What every stage shares around its science: the optimiser, the progress line, saving, the chain of stages (what
each is built from, when an output may be reused, how long each took), judging a scorer against the gold human,
the shared flags' checks. No equation of the pipeline here; the chain imports a stage's script only to build it.
"""
import dataclasses
import importlib
import json
import math
import os
import random
import re
import sys
import time
import zlib
from dataclasses import dataclass

import torch

import data
from model import load_checkpoint, save_checkpoint, train_dtype
from runs import (FUSED, CheckpointError, atomic_write, average_gradients, barrier, deferred_interrupt,
                  parse_config, pick_device, rank, resolve_preset, same_start)

# ----------------------------------------------------------------------------- the fields every stage's Config has

@dataclass
class StageConfig:
    out_dir: str = "out"
    """where every stage reads and writes its checkpoint and metrics.json"""
    preset: str = "auto"
    """small, medium, or auto (medium when CUDA is available): see sft.PRESETS"""
    device: str = "auto"
    """cpu, cuda, mps (Apple's GPU), or auto: CUDA, then MPS, then the CPU"""
    seed: int = 1337
    """every stage's seed: a later script builds the earlier stages with it"""
    train_dtype: str = "auto"
    """pretraining's, SFT's and the reward model's steps: bfloat16, float32 or auto (model.train_dtype), as --seed"""


# ----------------------------------------------------------------------------- the optimiser, the log line, saving

def make_optimizer(model, lr, weight_decay, device):
    """AdamW with weight decay on matrices only (nanoGPT); the fused kernel on CUDA (runs.FUSED). Under torchrun
    every process starts from rank 0's weights (runs.same_start), which the averaged gradients keep equal."""
    same_start(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=FUSED.get(torch.device(device).type, False))


def lr_at(step, steps, lr, warmup=20):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(model, optimizer, loss, lr, clip=1.0):
    """One AdamW step on loss, its gradient clipped to norm clip. Every stage trains through here, so here data
    parallelism averages the processes' gradients (runs.average_gradients: one all-reduce, where DDP's wrapper would
    change every call and checkpoint of the model): the clip and the step see the same gradient in every process."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return float(norm)


def write_metrics(out_dir, metrics):
    with atomic_write(os.path.join(out_dir, "metrics.json")) as f:
        json.dump(metrics, f, indent=1)


def save_stage(out_dir, model, metrics, step, built_from=None):
    """A stage's two files, both or neither (each written atomically, Ctrl-C deferred), model.pt last: its presence
    tells later stages this one is done. built_from: the stage's record, kept in both. Rank 0 alone writes."""
    if rank() == 0:
        with deferred_interrupt():
            write_metrics(out_dir, {**metrics, "built_from": built_from})
            save_checkpoint(os.path.join(out_dir, "model.pt"), model, step=step, built_from=built_from)
    barrier()


def report(name, metrics, prompts, texts, sft_texts):
    """A later stage's closing lines: its numbers, then three held-out prompts, its sample and SFT's, gold-scored."""
    print(" | ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    for p, t, s in list(zip(prompts, texts, sft_texts))[:3]:
        print(f"--- {p.split('### Instruction:')[-1].split('###')[0].strip()!r}\n"
              f"  {name} ({data.gold_reward(p, t):+.2f}): {t}\n  sft ({data.gold_reward(p, s):+.2f}): {s}")


def log(step, **fields):
    """One progress line: step 00012 | loss 2.1234 | 120 ms"""
    parts = [f"step {step:05d}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
    print(" | ".join(parts), flush=True)


# ----------------------------------------------------------------------------- the chain of stages

# Each stage: the script whose Config builds it, the stages it starts from, and the Config fields that shape what it
# writes (the rest change only what is evaluated or printed). best_of_n, ppo and dpo end the chain: never reused.
CHAIN = {
    "pretrain":  ("sft", (), ("objective", "corpus", "seed", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                              "n_docs", "pretrain_steps", "pretrain_batch_size", "lr", "weight_decay", "train_dtype")),
    "sft":       ("sft", ("pretrain",), ("data", "seed", "n_demos", "sft_steps", "batch_size", "lr",
                                         "weight_decay", "train_dtype")),
    "pairs":     ("reward", ("sft",), ("n_prompts", "k", "retell", "tau", "grades", "seed", "max_new_tokens")),
    "reward":    ("reward", ("sft", "pairs"), ("data", "seed", "steps", "twin_steps", "batch_size", "lr",
                                               "weight_decay", "readout", "label_smoothing", "train_dtype")),
    "rejection": ("reward", ("sft", "reward"), ("seed", "rs_prompts", "rs_n", "rs_steps", "rs_batch_size", "lr",
                                                "weight_decay", "max_new_tokens", "train_dtype")),
    "best_of_n": ("reward", ("sft", "reward"), ()),
    "ppo":       ("ppo", ("sft", "reward"), ()),
    "dpo":       ("dpo", ("sft", "pairs"), ()),
}
OUTPUTS = {"pairs": ("reward", "pairs.jsonl"), "reward": ("reward", "model.pt")}  # the rest: <stage>/model.pt
BUILDERS = {"pretrain": "pretrain", "sft": "sft", "pairs": "label_training_pairs", "reward": "train",
            "rejection": "rejection_sampling"}  # the function of the stage's script that builds it


class StageMismatch(CheckpointError):
    """An earlier stage's output was built otherwise than this run asks: never reused silently."""


def output_path(stage, out_dir):
    return os.path.join(out_dir, *OUTPUTS.get(stage, (stage, "model.pt")))


def script_of(cfg):
    """The script whose Config cfg is ("sft", "reward", ...), also when that script runs as __main__."""
    return os.path.splitext(os.path.basename(sys.modules[type(cfg).__module__].__file__))[0]


def stage_config(stage, cfg):
    """The Config that builds stage: cfg itself when cfg belongs to that stage's script (the user's flags hold),
    else the defaults of cfg's preset with cfg's out_dir, device and seed, where cfg has one (`python ppo.py
    --seed=3` builds seed 3's chain, as notebooks/experiments/seeds.py does)."""
    script = importlib.import_module(CHAIN[stage][0])
    if script_of(cfg) != CHAIN[stage][0]:
        own = [f"--{f}={getattr(cfg, f)}" for f in ("seed", "train_dtype") if hasattr(cfg, f)]  # experiments' may lack
        cfg = parse_config(script.Config, [f"--preset={cfg.preset}", f"--out_dir={cfg.out_dir}",
                                           f"--device={cfg.device}", *own], script.PRESETS, script.check, quiet=True)
    return dataclasses.replace(cfg, stage={"pairs": "reward"}.get(stage, stage)) if hasattr(cfg, "stage") else cfg


def record(stage, cfg):
    """What stage is built from, with cfg: {"stage", "preset", "settings", "parents": {stage: record id}, "world"};
    a user's file among the settings is recorded by its content."""
    cfg = stage_config(stage, cfg)
    _, parents, fields = CHAIN[stage]
    fields = fields or [f.name for f in dataclasses.fields(cfg) if f.name != "train_dtype"]  # ppo, dpo: not used
    settings = {f: getattr(cfg, f) for f in fields if f not in ("stage", "out_dir", "device", "preset")}
    if "train_dtype" in settings:  # what auto is on this machine: a stage trained in bf16 is another draw than in fp32
        settings["train_dtype"] = train_dtype(pick_device(cfg.device), cfg.train_dtype)
    for f in ("corpus", "data"):
        if settings.get(f):
            with open(settings[f], "rb") as file:
                settings[f] = f"{settings[f]} (crc {zlib.crc32(file.read()):08x})"
    parents = [p for p in parents if not (p == "pairs" and cfg.data)]  # a user's pairs file replaces the stage
    parents += ["rejection"] if getattr(cfg, "init", "sft") == "rejection" else []  # ppo.py --init=rejection
    return {"stage": stage, "preset": resolve_preset(cfg.preset), "settings": settings, "world": data.fingerprint(),
            "parents": {p: record_id(read_record(output_path(p, cfg.out_dir))) for p in parents}}


def record_id(rec):
    return None if rec is None else f"{zlib.crc32(json.dumps(rec, sort_keys=True).encode()):08x}"


def read_record(path):
    """The record saved with an output (None when there is no output, or it has none)."""
    if path.endswith(".pt"):
        return load_checkpoint(path).get("built_from") if os.path.exists(path) else None
    if os.path.exists(path + ".built_from.json"):
        with open(path + ".built_from.json") as f:
            return json.load(f)
    return None


def check_reuse(stage, cfg, asked=None):
    """May this run reuse stage's output? Its world, preset and parents must be this run's, and its settings too where
    this run states them (cfg is the stage's own script's); else StageMismatch, one line with the fix. Settings
    that differ only from defaults nobody asked for are printed. The parents are checked the same way."""
    path, scfg = output_path(stage, cfg.out_dir), stage_config(stage, cfg)
    asked = script_of(cfg) == CHAIN[stage][0] if asked is None else asked
    have, want = read_record(path), record(stage, scfg)
    fix = f"delete {os.path.dirname(path)}/ to rebuild it, or pass --out_dir=<another folder>"
    if have is None:
        raise StageMismatch(f"stage {stage!r}: {path} has no record of what it was built from; {fix}")
    must = [f"the {have['preset']} preset (this run: {want['preset']})"] if have["preset"] != want["preset"] else []
    must += ["another world or tokenizer (data.py has changed since)"] if have["world"] != want["world"] else []
    must += [f"another {output_path(p, cfg.out_dir)} (rebuilt or removed since)" for p, i in have["parents"].items()
             if want["parents"].get(p) != i]
    settings = [f"{k}={have['settings'].get(k)!r} (this run: {v!r})" for k, v in want["settings"].items()
                if have["settings"].get(k) != v]
    if must or (asked and settings):
        raise StageMismatch(f"stage {stage!r}: {path} was built with {'; '.join(must + settings)}; {fix}")
    if settings:
        print(f"== reusing {path}, built with {'; '.join(settings)}")
    for parent in [p for p, i in have["parents"].items() if i is not None]:  # None: built without it (a test's)
        check_reuse(parent, scfg, asked=asked and CHAIN[parent][0] == CHAIN[stage][0])


def ensure_stage(stage, cfg):
    """The path of stage's output: built first (stage_config) if missing, else reused if check_reuse allows."""
    path = output_path(stage, cfg.out_dir)
    if os.path.exists(path):
        check_reuse(stage, cfg)
        return path
    print(f"== {path} is missing: running stage {stage!r} first")
    build = getattr(importlib.import_module(CHAIN[stage][0]), BUILDERS[stage])
    t0, before = time.time(), sum(BUILT.values())
    build(stage_config(stage, cfg))
    BUILT[stage] = time.time() - t0 - (sum(BUILT.values()) - before)  # its own time: the stages it built left out
    return path


BUILT = {}  # stage -> the seconds its build took in this process, for time_lines


def time_lines(cfg, stage, seconds):
    """The closing lines of a run (seconds long) that built earlier stages on its way: one a stage with the time it
    took, also written to <out_dir>/<stage>/times.json (notebooks/experiments/results.py --time reads it)."""
    times = {**BUILT, stage: seconds - sum(BUILT.values())}
    print("\n".join(f"time | {name:<9} | {s / 60:5.1f} min" for name, s in {**times, "total": seconds}.items()))
    if rank() == 0:
        with atomic_write(os.path.join(cfg.out_dir, stage, "times.json")) as f:
            json.dump({"seconds": times, "total": seconds, "threads": torch.get_num_threads(),
                       "train_dtype": train_dtype(pick_device(cfg.device), cfg.train_dtype)}, f, indent=1)


# ----------------------------------------------------------------------------- judging a scorer against the gold human

def pearson(x, y):
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-12))


def expected_accuracy(gold_gaps, chosen_scores, rejected_scores, tau):
    """The held-out accuracy and the ceiling averaged over the labeller's coin instead of one draw of it (a draw of
    512 labels moves both by points). gold_gaps[i] = g(chosen) - g(rejected). Returns (scorer, ceiling)."""
    gaps = torch.as_tensor(gold_gaps, dtype=torch.float64)  # (N,)
    # p_i = P(labeller prefers chosen_i) = sigmoid((g(chosen_i) - g(rejected_i)) / tau)
    p_chosen = torch.sigmoid(gaps / tau)  # (N,)
    # E[accuracy] = mean_i (p_i if r(chosen_i) > r(rejected_i), 1 - p_i if below, 1/2 if tied)
    # E[ceiling] = mean_i max(p_i, 1 - p_i)
    chosen, rejected = torch.as_tensor(chosen_scores), torch.as_tensor(rejected_scores)  # (N,), (N,)
    rm = torch.where(chosen > rejected, p_chosen, torch.where(chosen < rejected, 1 - p_chosen, 0.5))  # (N,)
    return float(rm.mean()), float(torch.maximum(p_chosen, 1 - p_chosen).mean())


def accuracy_by_term(pairs, chosen_scores, rejected_scores):
    """Which gold term decides each pair (its difference is the largest), and on the pairs each term decides how
    often the scorer and the labels agree with the gold order (ties left out): {term: {"pairs", "rm", "labels"}}."""
    rows = {}
    for p, r_w, r_l in zip(pairs, chosen_scores, rejected_scores):
        t_w, t_l = data.gold_terms(p["prompt"], p["chosen"]), data.gold_terms(p["prompt"], p["rejected"])
        diff = {k: t_w[k] - t_l[k] for k in t_w}
        gap = sum(diff.values())  # g(chosen) - g(rejected): > 0 when the label agrees with the gold order
        if gap == 0:
            continue
        row = rows.setdefault(max(diff, key=lambda k: abs(diff[k])), {"pairs": 0, "rm": 0, "labels": 0})
        row["pairs"] += 1
        row["rm"] += (float(r_w) > float(r_l)) == (gap > 0)
        row["labels"] += gap > 0
    return {k: {"pairs": v["pairs"], "rm": v["rm"] / v["pairs"], "labels": v["labels"] / v["pairs"]}
            for k, v in sorted(rows.items(), key=lambda kv: -kv[1]["pairs"])}


def agreement(chosen_scores, rejected_scores):
    """How often a scorer orders pairs as their labels do; a tie counts half (a coin would break it)."""
    chosen, rejected = torch.as_tensor(chosen_scores), torch.as_tensor(rejected_scores)
    return float(((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean())


def gold_gaps(pairs):
    """g(chosen_i) - g(rejected_i) of each pair, by the gold human: > 0 where its label agrees with the gold order."""
    return [data.gold_reward(p["prompt"], p["chosen"]) - data.gold_reward(p["prompt"], p["rejected"]) for p in pairs]


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


TEMPLATE = words(data.alpaca_prompt("", "-"))  # the Alpaca template's own words, which every prompt has
# Is a reward model's accuracy good? Beside it, scorers that read no weights and work on any English pairs: on
# Anthropic's HH pairs "the longer answer" alone agrees with the labels about 55% of the time (trlx issue 257)
RULES = {"the longer answer": lambda prompt, response: len(re.findall(r"[a-z]+", response.lower())),
         "names the request": lambda prompt, response: len((words(prompt) - TEMPLATE) & words(response))}


def baselines(pairs, gaps=(), tau=None):
    """Each rule's agreement with the pairs' labels and, given gaps[i] = g(chosen_i) - g(rejected_i), averaged over
    the labeller's coin (expected_accuracy): {rule: {"accuracy", "expected"}}."""
    out = {}
    for name, rule in RULES.items():
        w, l = (torch.tensor([float(rule(p["prompt"], p[k])) for p in pairs]) for k in ("chosen", "rejected"))
        out[name] = {"accuracy": agreement(w, l)}
        out[name].update({"expected": expected_accuracy(gaps, w, l, tau)[0]} if len(gaps) else {})
    return out


def split_by_prompt(pairs, val_frac, seed):
    """(train, val): every pair of a held-out prompt goes to val, so val accuracy is on unseen prompts."""
    prompts = sorted({p["prompt"] for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:int(len(prompts) * val_frac)])
    return [p for p in pairs if p["prompt"] not in held], [p for p in pairs if p["prompt"] in held]


def other_prompts(prompts):
    """For each prompt, the next one in the list that asks for none of its names, animals and places (prompt_swap)."""
    out = []
    for i, p in enumerate(prompts):
        want = set(data.requested(p))
        out.append(next(q for q in prompts[i + 1:] + prompts[:i] if not want & set(data.requested(q))))
    return out


def prompt_swap(score_fn, pairs):
    """Does a scorer read the prompt? score_fn(prompts, responses) -> (N,) orders each pair under its own prompt and
    under one that asks for something else (other_prompts): a prompt-blind scorer's agreement with the gold order
    does not drop, and the gold human's own drop is the most a scorer can show. Gold ties are skipped.
    Returns {"right", "swapped", "drop", "gold_swapped", "gold_drop", "pairs"}; agreements count ties half."""
    gaps = gold_gaps(pairs)
    pairs, gaps = [p for p, g in zip(pairs, gaps) if g != 0], [g for g in gaps if g != 0]
    prompts = [p["prompt"] for p in pairs]
    swapped = other_prompts(prompts)
    # the gold order under the right prompt: +1 if chosen is better, -1 if rejected is
    gold = torch.tensor([math.copysign(1, g) for g in gaps])  # (N,)
    a, b = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    agree = lambda diff: float((torch.sign(torch.as_tensor(diff, dtype=torch.float64)) * gold + 1).mean() / 2)
    right = agree(score_fn(prompts, a) - score_fn(prompts, b))
    other = agree(score_fn(swapped, a) - score_fn(swapped, b))
    gold_other = agree([data.gold_reward(q, x) - data.gold_reward(q, y) for q, x, y in zip(swapped, a, b)])
    return {"right": right, "swapped": other, "drop": right - other, "gold_swapped": gold_other,
            "gold_drop": 1 - gold_other, "pairs": len(pairs)}


# ----------------------------------------------------------------------------- rows of the scripts' check(cfg)
# Each yields (field, ok, allowed); parse_config stops at the first that fails, so a row may rely on those above it.

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
    """Is path a folder we can write in, or make (the nearest existing folder on its way is writable)?"""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def device_exists(name):
    if name in ("auto", "cpu", "mps"):
        return name != "mps" or torch.backends.mps.is_available()
    cuda = re.fullmatch(r"cuda(?::(\d+))?", name)
    return bool(cuda) and torch.cuda.is_available() and int(cuda.group(1) or 0) < torch.cuda.device_count()


def run_fields(cfg):
    """Rows for out_dir, device and seed, which every script has (preset is checked while parse_config applies it)."""
    yield "out_dir", bool(cfg.out_dir) and writable(cfg.out_dir), "a folder we can write in, or make"
    yield "device", device_exists(cfg.device), "auto, cpu, mps where Apple's GPU is, or cuda[:i] where CUDA has it"
    if hasattr(cfg, "seed"):
        yield "seed", 0 <= cfg.seed < 2 ** 63, "in [0, 2**63)"
    if hasattr(cfg, "train_dtype"):
        yield one_of(cfg, "train_dtype", "auto", "bfloat16", "float32")


