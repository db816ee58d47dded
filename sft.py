"""
Stage 1, self-supervised pretraining, and stage 2, supervised fine-tuning (SFT).

  pretrain (causal LM)  L = -1/T sum_t log p(x_t | x_<t)                                   (Radford et al. 2018)
  pretrain (masked LM)  L = -1/|M| sum_{t in M} log p(x_t | x with M corrupted)            (Devlin et al. 2019)
  SFT                   L = -1/|y| sum_t log pi(y_t | x, y_<t), prompt tokens x masked out  (Ouyang et al. 2022)

The masked-LM run uses the same blocks with bidirectional attention and is only for comparison: SFT starts from
the causal-LM checkpoint. The causal-LM loss is GPT.forward's cross-entropy (model.py); the SFT loss is sft_loss,
over the labels data.example_tensors masks (-1 on the prompt).

Below the two stages, under one banner, what every later stage shares: the optimiser (AdamW, warm-up and cosine
decay), the evaluation every stage reports (sample on the held-out prompts, score with the gold human: mean gold
reward, follow rate, KL to the SFT model, win rate), and the chain of stages (sft.CHAIN: what each stage is built
from, and when an existing output may be reused).

Run:  python sft.py --stage=pretrain [--objective=mlm] [--corpus=my.txt]
      python sft.py [--data=my_demos.jsonl]        (builds out/pretrain first if it is missing)
      torchrun --standalone --nproc_per_node=4 sft.py    (4 processes, each a quarter of every batch; any script)
"""
import dataclasses
import importlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
from model import (FUSED, GPT, CheckpointError, GPTConfig, atomic_write, autocast, average_gradients, barrier,
                   check_finite, data_parallel, deferred_interrupt, files_or_empty, interval, load_checkpoint,
                   load_model, mean_over_processes, my_share, non_negative, on_rank_0, one_line_errors, one_of,
                   parse_config, pick_device, positive, rank, resolve_preset, run_fields, same_start,
                   save_checkpoint, to_device, token_logprobs)


@dataclass
class Config:
    stage: str = "sft"
    """pretrain: self-supervised on the story corpus; sft: fine-tune the pretrained model on demonstrations"""
    objective: str = "clm"
    """pretraining objective: clm (next token) or mlm (masked tokens, bidirectional; written to out/pretrain_mlm)"""
    corpus: str = ""
    """a plain-text file to pretrain on (documents separated by blank lines); empty: the generated stories"""
    data: str = ""
    """a JSONL file of {"instruction", "input", "output"} demonstrations; empty: the generated ones"""
    out_dir: str = "out"
    """where every stage reads and writes its checkpoint and metrics.json"""
    preset: str = "auto"
    """small, medium, or auto (medium when CUDA is available): see sft.PRESETS"""
    device: str = "auto"
    """cpu, cuda, mps (Apple's GPU), or auto: CUDA, then MPS, then the CPU"""
    seed: int = 1337
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 192
    """longest prompt + response in tokens"""
    dropout: float = 0.0
    n_docs: int = 20000
    """stories in the generated pretraining corpus"""
    n_demos: int = 4000
    """generated SFT demonstrations"""
    pretrain_steps: int = 1600
    """many small steps: each copying skill (a name, an animal, a place) is learned in a step change of its own,
    and 400 steps of 32 windows learned one of the three where 1600 of 8 (the same tokens) learn all of them"""
    pretrain_batch_size: int = 8
    """windows of block_size tokens per pretraining step"""
    sft_steps: int = 900
    """SFT steps: the model must learn that the request, not the story before it, says whom a story is about. 900,
    not 600: the reward model starts from this model and learns from its samples, and on the seeds whose reward
    model did not learn to read the request, 900 steps made it read it; the worst seed's too, though some other
    seeds' reward models came out worse (notebooks/RESULTS.md, "How the recipe came to be")"""
    batch_size: int = 32
    """demonstrations per SFT step"""
    lr: float = 3e-3
    """peak learning rate of pretraining (SFT uses a third of it); linear warm-up, cosine decay"""
    weight_decay: float = 0.1
    eval_prompts: int = 128
    """held-out prompts for the gold-human evaluation"""
    max_new_tokens: int = 120
    compile: bool = False
    """pretraining only: run the forward through torch.compile (pays on CUDA; fixed shapes, one compile)"""


# small: the defaults, the whole chain on 2 CPU cores in minutes; medium: 3x the parameters and 1.5x the steps, what
# --preset=auto picks on CUDA (the README's results table says how long each took, measured)
PRESETS = {"small": {}, "medium": dict(n_layer=6, n_head=6, n_embd=192, lr=2e-3, n_docs=30000, n_demos=6000,
                                       pretrain_steps=2400, sft_steps=900)}


def check(cfg):
    """What each field allows: model.parse_config reports the first (field, ok, allowed) row that fails."""
    yield one_of(cfg, "stage", "pretrain", "sft")
    yield one_of(cfg, "objective", "clm", "mlm")
    yield from files_or_empty(cfg, "corpus", "data")
    yield from run_fields(cfg)
    yield from positive(cfg, "n_layer", "n_head", "n_embd", "block_size", "n_docs", "n_demos", "pretrain_steps",
                        "pretrain_batch_size", "sft_steps", "batch_size", "lr", "eval_prompts", "max_new_tokens")
    yield "n_head", cfg.n_embd % cfg.n_head == 0, f"a divisor of --n_embd={cfg.n_embd}"
    yield interval(cfg, "dropout", "[0, 1)")
    yield from non_negative(cfg, "weight_decay")
    if not cfg.data:
        yield enough_prompts(cfg, "n_demos", "train", cfg.seed)
    yield enough_prompts(cfg, "eval_prompts", "eval", EVAL_SEED)
    if cfg.stage == "sft" or cfg.objective == "clm":  # a model that will answer prompts: SFT fine-tunes this one
        P = data.longest_prompt_tokens()
        yield "block_size", cfg.block_size >= P + 2, f">= {P + 2}: the longest prompt ({P} tokens), a response and EOT"
        yield max_new_tokens_fit(cfg, cfg.block_size, f"--block_size={cfg.block_size}")


# ----------------------------------------------------------------------------- stage 1: pretraining

def pretrain(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed + rank())  # each process its own dropout; the weights are rank 0's (make_optimizer)
    mlm = cfg.objective == "mlm"
    docs = data.load_corpus(cfg.corpus) if cfg.corpus else data.pretrain_corpus(cfg.n_docs, seed=cfg.seed)
    eot = data.special(data.EOT)
    stream = torch.tensor([t for d in docs for t in data.encode(d) + [eot]])  # the corpus as one token stream
    n_val = max(len(stream) // 20, cfg.block_size + 2)
    train_stream, val_stream = stream[:-n_val], stream[-n_val:]
    if len(train_stream) <= cfg.block_size:  # lm_batch draws windows of block_size + 1 tokens
        raise ValueError(f"a corpus of {len(stream)} tokens is too short for --block_size={cfg.block_size}; "
                         f"raise --n_docs or pass a longer --corpus")
    # the exact vocabulary: padding it to a multiple of 64 would leave ids no token decodes to, yet sampling can draw
    model = GPT(GPTConfig(data.tokenizer().n_vocab, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout,
                          causal=not mlm)).to(device)
    print(f"pretraining ({cfg.objective}) {model.num_params() / 1e6:.2f}M parameters on {len(train_stream)} tokens")
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, device)
    forward = torch.compile(model) if cfg.compile else model  # same weights; checkpoints save the plain model
    rng = torch.Generator().manual_seed(cfg.seed)

    def batch(stream_):
        x, y = data.lm_batch(stream_, cfg.block_size, cfg.pretrain_batch_size, rng)  # (B, T), (B, T)
        if mlm:  # predict the chosen tokens of x itself, from a corrupted copy of x
            x, y = data.mlm_mask(x, data.special(data.MASK), data.tokenizer().n_vocab - 3, rng)
        return to_device(x, device), to_device(y, device)

    history = []
    for step in range(cfg.pretrain_steps):
        t0 = time.time()
        model.train()
        x, y = map(my_share, batch(train_stream))  # (B/N, T) each: this process's rows of the global batch
        with autocast(device):
            _, loss = forward(x, y)
        check_finite(step, loss=loss)
        optimizer_step(model, optimizer, loss, lr_at(step, cfg.pretrain_steps, cfg.lr))
        loss_value = mean_over_processes({"loss": loss.item()})["loss"]  # the global batch's
        history.append({"step": step, "loss": loss_value})
        log(step, loss=loss_value, ms=int(1000 * (time.time() - t0)))
    model.eval()
    with torch.no_grad(), autocast(device):
        val_loss = sum(model(*batch(val_stream))[1].item() for _ in range(10)) / 10
    metrics = {"objective": cfg.objective, "val_loss": val_loss, "train_loss": history[-1]["loss"],
               "params": model.num_params(), "config": asdict(cfg), "history": history}
    out = os.path.join(cfg.out_dir, "pretrain_mlm" if mlm else "pretrain")
    save_stage(out, model, metrics, step=cfg.pretrain_steps, built_from=record("pretrain", cfg))
    print(f"val loss {val_loss:.4f} -> {out}/model.pt")
    return metrics


# ----------------------------------------------------------------------------- stage 2: SFT

def sft_batch(examples, batch_size, rng, device):
    """A batch of (ids, labels) pairs, right-padded; padded labels are -1 so they add nothing to the loss. Under
    torchrun, this process's share of it."""
    pick = my_share([examples[i] for i in torch.randint(len(examples), (batch_size,), generator=rng)])
    ids = data.pad_right([p[0] for p in pick], data.special(data.PAD))  # (B, T)
    labels = data.pad_right([p[1] for p in pick], -1)  # (B, T)
    return to_device(ids, device), to_device(labels, device)


def sft_loss(logits, labels):
    """The SFT loss of a batch: logits (B, T, V) and labels (B, T), where labels[b, t] is the token after position t
    and -1 on the prompt and on padding (data.example_tensors), so only response tokens count."""
    # L = -1/|y| sum_t log pi(y_t | x, y_<t): a mean over the response tokens of the batch, prompt labels -1 ignored
    return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-1)


def finetune(model, examples, steps, lr, cfg, device, tag="sft"):
    """Response-only cross-entropy on (ids, labels) examples at peak learning rate lr (cfg gives batch_size,
    weight_decay and seed); returns the per-step history."""
    optimizer = make_optimizer(model, lr, cfg.weight_decay, device)
    rng = torch.Generator().manual_seed(cfg.seed)
    history = []
    for step in range(steps):
        t0 = time.time()
        model.train()
        ids, labels = sft_batch(examples, cfg.batch_size, rng, device)
        with autocast(device):
            logits, _ = model(ids)  # (B, T, V)
            loss = sft_loss(logits, labels)
        check_finite(step, **{f"{tag}_loss": loss})
        optimizer_step(model, optimizer, loss, lr_at(step, steps, lr, warmup=10))
        loss_value = mean_over_processes({"loss": loss.item()})["loss"]  # the mean of the processes' shares
        history.append({"step": step, "loss": loss_value})
        log(step, **{f"{tag}_loss": loss_value}, ms=int(1000 * (time.time() - t0)))
    return history


@torch.no_grad()
def sft_val_loss(model, examples, device, batch_size=64):
    model.eval()
    losses = []
    for i in range(0, len(examples), batch_size):
        ids = data.pad_right([e[0] for e in examples[i:i + batch_size]], data.special(data.PAD)).to(device)
        labels = data.pad_right([e[1] for e in examples[i:i + batch_size]], -1).to(device)
        with autocast(device):
            losses.append(sft_loss(model(ids)[0], labels).item())
    return sum(losses) / len(losses)


def sft(cfg):
    device = pick_device(cfg.device)
    # the demonstrations first: a bad file of the user's is reported before anything is pretrained
    demos = data.load_sft_jsonl(cfg.data) if cfg.data else data.sft_examples(cfg.n_demos, seed=cfg.seed)
    base = ensure_stage("pretrain", cfg)
    torch.manual_seed(cfg.seed + rank())  # each process its own dropout under torchrun
    model = load_model(base, device)
    train = data.sft_tensors(demos, model.config.block_size)
    val = data.sft_tensors(data.sft_examples(256, seed=99, split="eval"), model.config.block_size)
    prompts = eval_prompts(cfg.eval_prompts)
    before, before_texts = evaluate(model, prompts, cfg.max_new_tokens, device)
    before["val_loss"] = sft_val_loss(model, val, device)
    print(f"pretrained: {json.dumps(before)}\n  sample: {before_texts[0]!r}")
    history = finetune(model, train, cfg.sft_steps, cfg.lr / 3, cfg, device)  # fine-tuning: a third of the rate
    after, texts = evaluate(model, prompts, cfg.max_new_tokens, device)
    after["val_loss"] = sft_val_loss(model, val, device)
    print(f"sft: {json.dumps(after)}")
    for p, t in list(zip(prompts, texts))[:3]:
        print(f"--- {p.split('### Instruction:')[-1].strip()!r}\n{t}")
    metrics = {**after, "pretrained": before, "config": asdict(cfg), "history": history}
    save_stage(os.path.join(cfg.out_dir, "sft"), model, metrics, step=cfg.sft_steps, built_from=record("sft", cfg))
    return metrics


# =====================================================================================================================
# Shared by every later stage: the optimiser, the evaluation by the gold human, the chain of stages, and the
# checks of flags that the later stages' Configs share.
# =====================================================================================================================


# ----------------------------------------------------------------------------- optimisation, shared by every stage

def make_optimizer(model, lr, weight_decay, device):
    """AdamW with weight decay on matrices only (nanoGPT); the fused kernel on CUDA (model.FUSED). Under torchrun
    every process starts from rank 0's weights (model.same_start), which the averaged gradients keep equal."""
    same_start(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95),
                             fused=FUSED.get(torch.device(device).type, False))


def lr_at(step, steps, lr, warmup=20):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr / 10 + (lr - lr / 10) * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(model, optimizer, loss, lr, clip=1.0):
    """One AdamW step on loss, its gradient clipped to norm clip. Every stage trains through here, so this is where
    data parallelism averages the processes' gradients: one explicit all-reduce (model.average_gradients) rather
    than DistributedDataParallel, whose wrapper would change every call and checkpoint of the model, and whose
    overlap of communication with the backward pass matters little at these sizes. The clip and the step then see
    the same gradient in every process."""
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
    """A stage's two files, both or neither: each is written to a temporary file and renamed, Ctrl-C waits until both
    are in place, and model.pt, whose presence tells later stages this one is done, comes last. built_from: the
    stage's record (record()), kept in both. Under torchrun rank 0 writes them and the others wait until it has."""
    if rank() == 0:
        with deferred_interrupt():
            write_metrics(out_dir, {**metrics, "built_from": built_from})
            save_checkpoint(os.path.join(out_dir, "model.pt"), model, step=step, built_from=built_from)
    barrier()


def log(step, **fields):
    """One progress line: step 00012 | loss 2.1234 | 120 ms"""
    parts = [f"step {step:05d}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
    print(" | ".join(parts), flush=True)


# ----------------------------------------------------------------------------- sampling and the gold evaluation

EVAL_SEED = 7


def eval_prompts(n):
    """The held-out prompts every stage is scored on (the "eval" split of data.tasks)."""
    return [data.alpaca_prompt(i, x) for i, x in data.tasks("eval", n, seed=EVAL_SEED)]


def train_prompts(n, seed):
    """n training prompts (the "train" split of data.tasks, disjoint from the held-out ones) drawn with seed."""
    return [data.alpaca_prompt(i, x) for i, x in data.tasks("train", n, seed=seed)]


@torch.no_grad()
def sample(model, prompts, max_new_tokens, temperature=1.0, batch_size=64, device="cpu", top_k=None):
    """Responses to prompts. Returns (texts, prompt_ids, response_ids, ended) where response_ids are 1-d tensors
    up to and including EOS, and ended says whether each response emitted EOS."""
    eot = data.special(data.EOT)
    texts, prompt_ids, response_ids, ended = [], [], [], []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        p = [torch.tensor(data.encode(s)) for s in prompts[i:i + batch_size]]
        idx, mask = data.pad_left(p, eot)
        with autocast(device):
            out = model.generate(idx.to(device), max_new_tokens, temperature, top_k, eos_token_id=eot,
                                 attention_mask=mask.to(device))
        for pi, row in zip(p, out[:, idx.size(1):].cpu()):
            stop = (row == eot).nonzero()
            r = row[:int(stop[0]) + 1] if len(stop) else row
            prompt_ids.append(pi)
            response_ids.append(r)
            ended.append(bool(len(stop)))
            texts.append(data.decode(r[:-1] if len(stop) else r))
    return texts, prompt_ids, response_ids, ended


def sequence_logps(model, ids, labels):
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over each row's response tokens: ids (B, T), labels (B, T) ->
    (B,). labels[b, t] is the token that follows ids[b, t], -1 on prompt and padding (data.example_tensors' layout).
    Padding is on the right, so a causal model's real positions never see it."""
    logits, _ = model(ids)  # (B, T, V)
    logprobs = token_logprobs(logits, labels.clamp(min=0))  # (B, T)
    return (logprobs * (labels != -1)).sum(1)  # (B,)


@torch.no_grad()
def sequence_logprobs(model, prompt_ids, response_ids, device="cpu", batch_size=64):
    """log pi(y | x) of token lists: (N,)."""
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        examples = [data.example_tensors(p.tolist(), r.tolist(), model.config.block_size)
                    for p, r in zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size])]
        ids = to_device(data.pad_right([e[0] for e in examples], data.special(data.PAD)), device)  # (B, T)
        labels = to_device(data.pad_right([e[1] for e in examples], -1), device)  # (B, T)
        with autocast(device):
            out.append(sequence_logps(model, ids, labels).float().cpu())
    return torch.cat(out)


def win_rate(prompts, responses, baseline):
    """Fraction of prompts where the gold human prefers responses over baseline; ties count half."""
    wins = [0.5 if a == b else float(a > b) for a, b in
            ((data.gold_reward(p, r), data.gold_reward(p, s)) for p, r, s in zip(prompts, responses, baseline))]
    return sum(wins) / len(wins)


@on_rank_0
def evaluate(model, prompts, max_new_tokens, device="cpu", ref=None, seed=0):
    """Sample once per held-out prompt and score with the gold human. With ref: the mean sequence KL(pi || ref),
    estimated on the samples as sum_t log pi(y_t|.) - log ref(y_t|.). Under torchrun rank 0 evaluates with this
    seed and the others wait for its numbers (model.on_rank_0): one process's numbers."""
    torch.manual_seed(seed)
    texts, p_ids, r_ids, ended = sample(model, prompts, max_new_tokens, device=device)
    gold = [data.gold_reward(p, r) for p, r in zip(prompts, texts)]
    # follows the template: a new text right after "### Response:\n" (capitalised, not the continuation of the
    # prompt), no further template sections, and EOS at the end
    clean = [e and t[:1].isupper() and "###" not in t for t, e in zip(texts, ended)]
    follows = [data.follows(p, t) for p, t in zip(prompts, texts)]
    metrics = dict(gold_reward=sum(gold) / len(gold), template_eos_rate=sum(clean) / len(clean),
                   follow_rate=sum(follows) / len(follows),
                   mean_length=sum(len(r) for r in r_ids) / len(r_ids))
    if ref is not None:
        kl = sequence_logprobs(model, p_ids, r_ids, device) - sequence_logprobs(ref, p_ids, r_ids, device)
        metrics["kl"] = float(kl.mean())
    return metrics, texts


def compare_with_sft(policy, sft_model, prompts, max_new_tokens, device, seed=0, sft_eval=None):
    """What every later stage reports, on the held-out prompts and one sampling seed for both models: its mean gold
    reward next to the SFT model's, its KL to the SFT model, and the gold human's win rate of its samples over SFT's.
    sft_eval: the SFT model's (metrics, texts) from evaluate with this seed, when the caller has them already.
    Returns (metrics, texts, sft_texts); metrics["policy"] and metrics["sft"] hold the full evaluations."""
    sft_eval, sft_texts = sft_eval or evaluate(sft_model, prompts, max_new_tokens, device, seed=seed)
    policy_eval, texts = evaluate(policy, prompts, max_new_tokens, device, ref=sft_model, seed=seed)
    metrics = {"gold_reward": policy_eval["gold_reward"], "gold_reward_sft": sft_eval["gold_reward"],
               "follow_rate": policy_eval["follow_rate"], "follow_rate_sft": sft_eval["follow_rate"],
               "kl": policy_eval["kl"], "win_rate_vs_sft": win_rate(prompts, texts, sft_texts),
               "policy": policy_eval, "sft": sft_eval}
    return metrics, texts, sft_texts


# ----------------------------------------------------------------------------- the chain of stages

# Each stage: the script whose Config builds it, the stages it starts from, and the Config fields that shape what
# it writes (the rest only change what is evaluated or printed). best_of_n, ppo and dpo end the chain: recorded, never
# reused.
CHAIN = {
    "pretrain":  ("sft", (), ("objective", "corpus", "seed", "n_layer", "n_head", "n_embd", "block_size", "dropout",
                              "n_docs", "pretrain_steps", "pretrain_batch_size", "lr", "weight_decay")),
    "sft":       ("sft", ("pretrain",), ("data", "seed", "n_demos", "sft_steps", "batch_size", "lr",
                                         "weight_decay")),
    "pairs":     ("reward", ("sft",), ("n_prompts", "k", "retell", "tau", "grades", "seed", "max_new_tokens")),
    "reward":    ("reward", ("sft", "pairs"), ("data", "seed", "steps", "twin_steps", "batch_size", "lr",
                                               "weight_decay", "readout", "label_smoothing")),
    "rejection": ("reward", ("sft", "reward"), ("seed", "rs_prompts", "rs_n", "rs_steps", "batch_size", "lr",
                                                "weight_decay", "max_new_tokens")),
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
    --seed=3` builds seed 3's chain, as notebooks/seeds.py does)."""
    script = importlib.import_module(CHAIN[stage][0])
    if script_of(cfg) != CHAIN[stage][0]:
        seed = [f"--seed={cfg.seed}"] if hasattr(cfg, "seed") else []  # an experiment's Config may have none
        cfg = parse_config(script.Config, [f"--preset={cfg.preset}", f"--out_dir={cfg.out_dir}",
                                           f"--device={cfg.device}", *seed], script.PRESETS, script.check, quiet=True)
    return dataclasses.replace(cfg, stage={"pairs": "reward"}.get(stage, stage)) if hasattr(cfg, "stage") else cfg


def record(stage, cfg):
    """What stage is built from, with cfg: {"stage", "preset", "settings", "parents": {stage: its record's id},
    "world"}. Saved with the stage's output; a user's file among the settings is recorded by its content."""
    cfg = stage_config(stage, cfg)
    _, parents, fields = CHAIN[stage]
    settings = {f: getattr(cfg, f) for f in fields or [f.name for f in dataclasses.fields(cfg)]
                if f not in ("stage", "out_dir", "device", "preset")}
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
    """May this run reuse stage's output? Its world, preset and parents must be this run's, and so must its settings
    where this run states them itself (cfg is the Config of the stage's own script). Otherwise StageMismatch: one
    line naming the stage, what differs and the fix. Settings that differ only from a preset's defaults nobody
    asked for are printed, not silent. The stage's parents are checked the same way, before any work."""
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
    """The path of stage's output, built first if missing: with cfg's settings when cfg is that stage's script's
    Config, else with the defaults of cfg's preset. An existing output is reused only as check_reuse allows."""
    path = output_path(stage, cfg.out_dir)
    if os.path.exists(path):
        check_reuse(stage, cfg)
        return path
    print(f"== {path} is missing: running stage {stage!r} first")
    build = getattr(importlib.import_module(CHAIN[stage][0]), BUILDERS[stage])
    build(stage_config(stage, cfg))
    return path


# ----------------------------------------------------------------------------- checks the later stages share

def enough_prompts(cfg, field, split, seed):
    """A check row: data.tasks can draw the field's number of distinct prompts of split (it says how many there are
    when it cannot)."""
    try:
        data.tasks(split, getattr(cfg, field), seed)
        return field, True, ""
    except ValueError as e:
        return field, False, f"at most what the world has ({e})"


def max_new_tokens_fit(cfg, block_size, where):
    """The check row of max_new_tokens: the world's longest prompt, the response and the EOT the reward model reads
    after a response that was cut off fit block_size."""
    P = data.longest_prompt_tokens()
    # P + max_new_tokens + 1 <= block_size
    return "max_new_tokens", P + cfg.max_new_tokens + 1 <= block_size, \
        f"<= {block_size - P - 1}, so the longest prompt ({P} tokens), the response and EOT fit {where}"


def fits_sft_model(cfg):
    """max_new_tokens_fit for a later stage, against the block_size of the SFT model its preset builds. A checkpoint
    trained with another --block_size is checked only when it is used (GPT.trunk raises, in one line)."""
    block_size = dataclasses.replace(Config(), **PRESETS[cfg.preset]).block_size
    return max_new_tokens_fit(cfg, block_size, f"block_size {block_size} of the {cfg.preset} preset's SFT model")


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    with one_line_errors(), data_parallel(cfg, "pretrain_batch_size" if cfg.stage == "pretrain" else "batch_size"):
        (pretrain if cfg.stage == "pretrain" else sft)(cfg)


if __name__ == "__main__":
    main()
