"""
Stage 1, self-supervised pretraining, and stage 2, supervised fine-tuning (SFT).

  pretrain (causal LM)  L = -1/T sum_t log p(x_t | x_<t)                                   (Radford et al. 2018)
  pretrain (masked LM)  L = -1/|M| sum_{t in M} log p(x_t | x with M corrupted)            (Devlin et al. 2019)
  SFT                   L = -1/|y| sum_t log pi(y_t | x, y_<t), prompt tokens x masked out  (Ouyang et al. 2022)

The masked-LM run uses the same blocks with bidirectional attention and is only for comparison: SFT starts from
the causal-LM checkpoint. The causal-LM loss is GPT.forward's cross-entropy (model.py); the SFT loss is sft_loss,
over the labels data.example_tensors masks (-1 on the prompt).

Below the two stages, the evaluation every stage reports, since following instructions is what SFT teaches: sample
once per held-out prompt and score with the gold human (mean gold reward, follow rate, KL to the SFT model, and
the win rate: how often the gold human prefers a model's response to the SFT model's for the same prompt).

Run:  python sft.py --stage=pretrain [--objective=mlm] [--corpus=my.txt]
      python sft.py [--data=my_demos.jsonl]        (builds out/pretrain first if it is missing)
      torchrun --standalone --nproc_per_node=4 sft.py    (4 processes, each a quarter of every batch; any script)
"""
import dataclasses
import functools
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import stages
from model import GPT, GPTConfig, load_model, sequence_logps, train_autocast, train_dtype
from runs import (autocast, check_finite, data_parallel, mean_over_processes, my_share, on_rank_0, one_line_errors,
                  parse_config, pick_device, rank, to_device)
from stages import StageConfig, files_or_empty, interval, non_negative, one_of, positive, run_fields


@dataclass
class Config(StageConfig):
    stage: str = "sft"
    """pretrain: self-supervised on the story corpus; sft: fine-tune the pretrained model on demonstrations"""
    objective: str = "clm"
    """pretraining objective: clm (next token) or mlm (masked tokens, bidirectional; written to out/pretrain_mlm)"""
    corpus: str = ""
    """a plain-text file to pretrain on (documents separated by blank lines); empty: the generated stories"""
    data: str = ""
    """a JSONL file of {"instruction", "input", "output"} demonstrations; empty: the generated ones"""
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
    seeds' reward models came out worse (notebooks/experiments/RESULTS.md, "How the recipe came to be")"""
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
    print(f"pretraining ({cfg.objective}) {model.num_params() / 1e6:.2f}M parameters on {len(train_stream)} tokens, "
          f"steps in {train_dtype(device, cfg.train_dtype)}")
    optimizer = stages.make_optimizer(model, cfg.lr, cfg.weight_decay, device)
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
        with train_autocast(device, cfg.train_dtype):
            _, loss = forward(x, y)
        check_finite(step, loss=loss)
        stages.optimizer_step(model, optimizer, loss, stages.lr_at(step, cfg.pretrain_steps, cfg.lr))
        loss_value = mean_over_processes({"loss": loss.item()})["loss"]  # the global batch's
        history.append({"step": step, "loss": loss_value})
        stages.log(step, loss=loss_value, ms=int(1000 * (time.time() - t0)))
    model.eval()
    with torch.no_grad(), autocast(device):
        val_loss = sum(model(*batch(val_stream))[1].item() for _ in range(10)) / 10
    metrics = {"objective": cfg.objective, "val_loss": val_loss, "train_loss": history[-1]["loss"],
               "params": model.num_params(), "config": asdict(cfg), "history": history}
    out = os.path.join(cfg.out_dir, "pretrain_mlm" if mlm else "pretrain")
    stages.save_stage(out, model, metrics, step=cfg.pretrain_steps, built_from=stages.record("pretrain", cfg))
    print(f"val loss {val_loss:.4f} -> {out}/model.pt")
    return metrics


# ----------------------------------------------------------------------------- stage 2: SFT

def length_grouped(lengths, batch_size, rng, groups=8):
    """Endless batches of indices: each row drawn at random as before, but `groups` batches at a time, sorted by
    length and cut into batches (fairseq's and Hugging Face's group_by_length), so a batch pads little: of a batch
    of 32 demonstrations padded to its longest, 94% of the tokens are real where 72% were."""
    while True:
        idx = torch.randint(len(lengths), (groups * batch_size,), generator=rng)  # (G * B,)
        idx = idx[torch.argsort(torch.as_tensor(lengths)[idx], stable=True)]  # shortest first
        for g in torch.randperm(groups, generator=rng).tolist():  # the G batches in random order
            yield idx[g * batch_size:(g + 1) * batch_size]


def sft_batch(examples, batch_size, rng, device, idx=None):
    """A batch of (ids, labels) pairs, right-padded; padded labels are -1 so they add nothing to the loss. idx: which
    examples (length_grouped's), else batch_size at random. Under torchrun, this process's share of it."""
    idx = torch.randint(len(examples), (batch_size,), generator=rng) if idx is None else idx
    pick = my_share([examples[i] for i in idx])
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
    optimizer = stages.make_optimizer(model, lr, cfg.weight_decay, device)
    rng = torch.Generator().manual_seed(cfg.seed)
    history = []
    batches = length_grouped([len(e[0]) for e in examples], cfg.batch_size, rng)
    print(f"{tag}: {steps} steps of {cfg.batch_size} demonstrations in {train_dtype(device, cfg.train_dtype)}")
    for step in range(steps):
        t0 = time.time()
        model.train()
        ids, labels = sft_batch(examples, cfg.batch_size, rng, device, next(batches))
        with train_autocast(device, cfg.train_dtype):
            logits, _ = model(ids)  # (B, T, V)
            loss = sft_loss(logits, labels)
        check_finite(step, **{f"{tag}_loss": loss})
        stages.optimizer_step(model, optimizer, loss, stages.lr_at(step, steps, lr, warmup=10))
        loss_value = mean_over_processes({"loss": loss.item()})["loss"]  # the mean of the processes' shares
        history.append({"step": step, "loss": loss_value})
        stages.log(step, **{f"{tag}_loss": loss_value}, ms=int(1000 * (time.time() - t0)))
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
    base = stages.ensure_stage("pretrain", cfg)
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
    stages.save_stage(os.path.join(cfg.out_dir, "sft"), model, metrics, step=cfg.sft_steps,
                      built_from=stages.record("sft", cfg))
    return metrics


# ----------------------------------------------------------------------------- sampling and the gold evaluation

EVAL_SEED = 7


def eval_prompts(n):
    """The held-out prompts every stage is scored on (the "eval" split of data.tasks)."""
    return [data.alpaca_prompt(i, x) for i, x in data.tasks("eval", n, seed=EVAL_SEED)]


def train_prompts(n, seed):
    """n training prompts (the "train" split of data.tasks, disjoint from the held-out ones) drawn with seed."""
    return [data.alpaca_prompt(i, x) for i, x in data.tasks("train", n, seed=seed)]


@torch.no_grad()
def sample(model, prompts, max_new_tokens, temperature=1.0, batch_size=64, device="cpu"):
    """Responses to prompts. Returns (texts, prompt_ids, response_ids, ended) where response_ids are 1-d tensors
    up to and including EOS, and ended says whether each response emitted EOS."""
    eot = data.special(data.EOT)
    texts, prompt_ids, response_ids, ended = [], [], [], []
    model.eval()
    for i in range(0, len(prompts), batch_size):
        p = [torch.tensor(data.encode(s)) for s in prompts[i:i + batch_size]]
        idx, mask = data.pad_left(p, eot)
        with autocast(device):
            out = model.generate(idx.to(device), max_new_tokens, temperature, eos_token_id=eot,
                                 attention_mask=mask.to(device))
        for pi, row in zip(p, out[:, idx.size(1):].cpu()):
            stop = (row == eot).nonzero()
            r = row[:int(stop[0]) + 1] if len(stop) else row
            prompt_ids.append(pi)
            response_ids.append(r)
            ended.append(bool(len(stop)))
            texts.append(data.decode(r[:-1] if len(stop) else r))
    return texts, prompt_ids, response_ids, ended


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


def tokenize_responses(prompts, responses):
    """prompt + response + EOT as right-padded ids and mask (B, T), and where each response starts (B,)."""
    eot = data.special(data.EOT)
    prompt_ids = [data.encode(p) for p in prompts]
    seqs = [torch.tensor(p + data.encode(r) + [eot]) for p, r in zip(prompt_ids, responses)]
    mask = data.pad_right([torch.ones(len(s), dtype=torch.bool) for s in seqs], False)
    return data.pad_right(seqs, eot), mask, torch.tensor([len(p) for p in prompt_ids])


def win_rate(prompts, responses, baseline):
    """Fraction of prompts where the gold human prefers responses over baseline; ties count half."""
    wins = [0.5 if a == b else float(a > b) for a, b in
            ((data.gold_reward(p, r), data.gold_reward(p, s)) for p, r, s in zip(prompts, responses, baseline))]
    return sum(wins) / len(wins)


@on_rank_0
def evaluate(model, prompts, max_new_tokens, device="cpu", ref=None, seed=0):
    """Sample once per held-out prompt and score with the gold human. With ref: the mean sequence KL(pi || ref),
    estimated on the samples as sum_t log pi(y_t|.) - log ref(y_t|.). Under torchrun rank 0 evaluates with this
    seed and the others wait for its numbers (runs.on_rank_0): one process's numbers."""
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


# ----------------------------------------------------------------------------- checks: the prompts and the block size

@functools.lru_cache(maxsize=None)
def longest_prompt_tokens():
    """Tokens in the longest prompt data.random_task can make. A word's tokens do not depend on its neighbours (the
    pre-tokenizer splits at spaces), so each template filled slot by slot with its longest word is its longest."""
    slots = dict(N=data.NAMES, A=data.ANIMALS, P=data.PLACES, adj=data.ADJS)  # random_task's slots and their words
    longest = 0
    for instruction, input in [(t, "") for t in data.INSTRUCTIONS] + [(data.CONTINUE, t) for t in data.OPENINGS]:
        tokens = lambda fill: len(data.encode(data.alpaca_prompt(instruction.format(**fill), input.format(**fill))))
        fill = {k: words[0] for k, words in slots.items()}
        for k, words in slots.items():
            fill[k] = max(words, key=lambda w: tokens({**fill, k: w}))
        longest = max(longest, tokens(fill))
    return longest


def enough_prompts(cfg, field, split, seed):
    """A check row: data.tasks can draw the field's number of distinct prompts of split."""
    try:
        data.tasks(split, getattr(cfg, field), seed)
        return field, True, ""
    except ValueError as e:
        return field, False, f"at most what the world has ({e})"


def max_new_tokens_fit(cfg, block_size, where):
    """The check row of max_new_tokens: the longest prompt, the response and an EOT after it fit block_size."""
    P = longest_prompt_tokens()
    # P + max_new_tokens + 1 <= block_size
    return "max_new_tokens", P + cfg.max_new_tokens + 1 <= block_size, \
        f"<= {block_size - P - 1}, so the longest prompt ({P} tokens), the response and EOT fit {where}"


def fits_sft_model(cfg):
    """max_new_tokens_fit for a later stage, against the block_size of the SFT model its preset builds."""
    block_size = dataclasses.replace(Config(), **PRESETS[cfg.preset]).block_size
    return max_new_tokens_fit(cfg, block_size, f"block_size {block_size} of the {cfg.preset} preset's SFT model")


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails."""
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
        P = longest_prompt_tokens()
        yield "block_size", cfg.block_size >= P + 2, f">= {P + 2}: the longest prompt ({P} tokens), a response and EOT"
        yield max_new_tokens_fit(cfg, cfg.block_size, f"--block_size={cfg.block_size}")


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    with one_line_errors(), data_parallel(cfg, "pretrain_batch_size" if cfg.stage == "pretrain" else "batch_size"):
        (pretrain if cfg.stage == "pretrain" else sft)(cfg)


if __name__ == "__main__":
    main()
