"""
Stage 3a: preference data, the reward model, best-of-N, and rejection-sampling fine-tuning.

  labeller     P(a > b) = sigmoid((g(a) - g(b)) / tau)       g = data.gold_reward: noisy, like human labellers
  reward model L = -log sigmoid(r(x, y_w) - r(x, y_l) - m)   Bradley-Terry (Ouyang et al. 2022, eq. 1); m = 0
                                                             unless a pair has LLaMA-2's margin (Touvron et al. 2023,
                                                             eq. 2): how much better the labeller said y_w is;
               with label smoothing eps, (1 - eps) L(z) + eps L(-z), z = r_w - r_l - m: each label trusted 1 - eps
  score        r(x, y) = 1/|y| sum_{t in y} v(x, y_<=t)     the head's mean over the response (readout "mean");
                                                             InstructGPT reads v at the last token ("last")
  best-of-N    y* = argmax_{y_1..y_N ~ pi_sft} r(x, y),   KL(pi_bon || pi_sft) = log N - (N - 1) / N
  rejection    fine-tune pi_sft on best-of-N samples of training prompts (Touvron et al. 2023, LLaMA-2 3.2.3)

The reward model is the SFT model with a scalar head (InstructGPT: the RM starts from the SFT model). The pairs
are all pairs of k SFT samples per training prompt, plus each sample against its retold twin (the same story told
about someone else, or about what was asked: `retold`), labelled by the simulated labeller and stored as JSONL
{"prompt", "chosen", "rejected"}, which dpo.py trains on too. The twins are a contrast set: without them the reward
model ranks stories by mood and ending and does not read the prompt (stages.prompt_swap measures it).

Run:  python reward.py                       (builds missing earlier stages; out/reward/)
      python reward.py --stage=best_of_n     (the best-of-N curve on held-out prompts; out/best_of_n/)
      python reward.py --stage=rejection     (best-of-N samples become SFT data; out/rejection/)
      python reward.py --data=my_pairs.jsonl (your own preference pairs)
"""
import itertools
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import data
import sft
import stages
from model import ScalarHeadModel, load_model, rm_scores, train_autocast, train_dtype
from runs import (atomic_write, autocast, barrier, check_finite, data_parallel, load_jsonl, mean_over_processes,
                  my_share, on_rank_0, one_line_errors, parse_config, pick_device, rank, save_jsonl, to_device)
from stages import StageConfig, files_or_empty, interval, non_negative, one_of, positive, run_fields


@dataclass
class Config(StageConfig):
    stage: str = "reward"
    """reward: label pairs and train the reward model; best_of_n: the best-of-N curve; rejection: LLaMA-2's RS"""
    data: str = ""
    """a JSONL file of {"prompt", "chosen", "rejected"} pairs; empty: sample and label them here"""
    val_frac: float = 0.1
    """with data: the share of its prompts whose pairs are held out, to judge the reward model on your own labels"""
    n_prompts: int = 1000
    """training prompts for the preference data"""
    k: int = 4
    """SFT samples per training prompt; all k(k-1)/2 pairs of them are labelled"""
    retell: bool = True
    """also compare each sample with the same story retold about someone else (or about what was asked)"""
    n_eval_pairs: int = 512
    """held-out pairs, on evaluation prompts"""
    tau: float = 0.5
    """labeller temperature in P(a > b) = sigmoid((g(a) - g(b)) / tau); smaller is less noisy"""
    grades: bool = True
    """the labeller also says how much better (graded_label), and the loss has LLaMA-2's margin for it"""
    steps: int = 1400
    """many small steps, as in pretraining: checking a story against its request is learned late"""
    twin_steps: int = 640
    """a curriculum: the first twin_steps train on the twin pairs alone, where only the request decides; 0: none"""
    batch_size: int = 2
    """prompts per step, each with all its pairs: 2 of the story world's are 16 responses (8 each) and 8 to 20 pairs"""
    lr: float = 1e-3
    weight_decay: float = 0.1
    label_smoothing: float = 0.1
    """eps in -(1 - eps) log sigmoid(z) - eps log sigmoid(-z): each label trusted 1 - eps (notebooks/GUIDE.md)"""
    readout: str = "mean"
    """mean: r(x, y) is the head's mean over the response, EOT included; last: at its last token (InstructGPT's)"""
    max_new_tokens: int = 120
    eval_prompts: int = 256
    """held-out prompts for centring the RM, its correlation with gold, and rejection sampling's evaluation"""
    bon_prompts: int = 256
    """held-out prompts for the best-of-N curve (the first of those SFT, PPO and DPO are scored on)"""
    bon_max_n: int = 16
    """best-of-N for N = 1, 2, 4, ..., bon_max_n"""
    rs_prompts: int = 512
    """rejection sampling: training prompts, each answered by best-of-rs_n"""
    rs_n: int = 8
    rs_steps: int = 100
    rs_batch_size: int = 8
    """rejection sampling: fine-tuning steps on the best-of-N samples, and samples per step"""


PRESETS = {"small": {}, "medium": dict(n_prompts=1500, steps=2100, rs_steps=150)}  # sft.PRESETS says what they are


# ----------------------------------------------------------------------------- the labeller and the loss

GRADES = (0.5, 1.5, 3.0)  # |z| below each: negligibly, slightly, clearly better; at or above the last: significantly
MARGINS = (0.0, 1 / 3, 2 / 3, 1.0)  # LLaMA-2's margin m(grade), their "small" set (Touvron et al. 2023, A.3.3)


def graded_label(gold_a, gold_b, tau, rng):
    """The simulated human: perceives z = g(a) - g(b) + tau * eps, eps ~ Logistic(0, 1), prefers a when z > 0, and
    grades |z| as LLaMA-2's annotators grade a preference. Returns (a is preferred, the grade's margin m)."""
    u = rng.random()
    # eps = log((1 - u) / u), Logistic(0, 1) for u ~ U(0, 1); z > 0 exactly when u < sigmoid((g(a) - g(b)) / tau)
    z = gold_a - gold_b + tau * math.log((1 - u) / u) if u > 0 else math.inf
    return z > 0, MARGINS[sum(abs(z) >= g for g in GRADES)]


def preference_loss(chosen_rewards, rejected_rewards, margins=0.0, smoothing=0.0):
    """Bradley-Terry with LLaMA-2's margin m ((B,) or a number; 0: a plain preference) and label smoothing eps,
    averaged over the batch; chosen_rewards, rejected_rewards (B,)."""
    z = chosen_rewards - rejected_rewards - margins
    # -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), with logsigmoid for numerical stability
    return -((1 - smoothing) * F.logsigmoid(z) + smoothing * F.logsigmoid(-z)).mean()


@torch.no_grad()
def score_texts(rm, prompts, responses, device, batch_size=64):
    """RM scores (N,) of response texts."""
    rm.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, starts = sft.tokenize_responses(prompts[i:i + batch_size], responses[i:i + batch_size])
        with autocast(device):
            out.append(rm_scores(rm, to_device(ids, device), to_device(mask, device), starts).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- preference pairs

def retold(prompt, text, rng):
    """The same story about someone else, or about what was asked: a story that does everything the prompt asks is
    retold to do none of it (each requested word becomes another of its kind), any other story to do all of it
    (each word of a requested kind becomes the requested one). The two differ only in which requests they meet."""
    meets_all = data.follows(prompt, text)
    for kind in (data.NAMES, data.ANIMALS, data.PLACES):
        for want in [w for w in data.requested(prompt) if w in kind]:
            if meets_all:
                text = re.sub(rf"\b{want}\b", rng.choice([w for w in kind if w != want]), text)
            else:
                text = re.sub(rf"\b({'|'.join(kind)})\b", want, text)
    return text


def label_pairs(policy, prompts, tau, max_new_tokens, device, seed, k=2, retell=False, grades=False):
    """k samples per prompt and all k(k-1)/2 pairs of them labelled by the simulated human (InstructGPT ranks K = 4
    to 9 responses per prompt). With retell, each sample is also compared with its twin (retold; or with each of a
    tuple of such functions' twins). With grades each pair keeps the labeller's margin (graded_label).
    Returns (pairs, agreement of the labels with the gold order, ties counted half)."""
    makers = (retold,) if retell is True else tuple(retell or ())
    torch.manual_seed(seed)
    texts, *_ = sft.sample(policy, [p for p in prompts for _ in range(k)], max_new_tokens, 1.0, 128, device)
    rng, pairs, agree = random.Random(seed), [], []
    for i, prompt in enumerate(prompts):
        own = texts[k * i:k * (i + 1)]
        twins = [(a, make(prompt, a, rng)) for a in own for make in makers]
        for a, b in list(itertools.combinations(own, 2)) + [(a, b) for a, b in twins if a != b]:
            ga, gb = data.gold_reward(prompt, a), data.gold_reward(prompt, b)
            a_wins, margin = graded_label(ga, gb, tau, rng)
            chosen, rejected = (a, b) if a_wins else (b, a)
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            pairs[-1].update({"margin": margin} if grades else {})
            agree.append(0.5 if ga == gb else float((ga > gb) == (chosen == a)))
    return pairs, sum(agree) / len(agree)


def load_pairs(path):
    """Preference pairs: JSONL {"prompt", "chosen", "rejected"}, optionally "margin" (m >= 0 of preference_loss)."""
    return load_jsonl(path, ("prompt", "chosen", "rejected"), numbers=("margin",))


def label_training_pairs(cfg):
    """Stage 'pairs': label_pairs on training prompts, written to out/reward/pairs.jsonl with its record beside it
    (record first, so pairs without one are never reused). Under torchrun rank 0 alone samples and writes."""
    device = pick_device(cfg.device)
    sft_path = stages.ensure_stage("sft", cfg)
    if rank() == 0:
        t0, prompts = time.time(), sft.train_prompts(cfg.n_prompts, cfg.seed)
        pairs, agreement = label_pairs(load_model(sft_path, device), prompts, cfg.tau, cfg.max_new_tokens, device,
                                       cfg.seed, cfg.k, cfg.retell, cfg.grades)
        save_pairs(cfg, pairs)
        print(f"labelled {len(pairs)} pairs in {time.time() - t0:.0f}s; agreement with gold {agreement:.3f}")
    barrier()


def save_pairs(cfg, pairs):
    path = stages.output_path("pairs", cfg.out_dir)
    with atomic_write(path + ".built_from.json") as f:
        json.dump(stages.record("pairs", cfg), f, indent=1)
    save_jsonl(path, pairs)


# ----------------------------------------------------------------------------- training

def pair_scores(rm, pairs, device):
    """RM scores of the chosen and of the rejected responses: (N,), (N,)."""
    prompts = [p["prompt"] for p in pairs]
    return (score_texts(rm, prompts, [p["chosen"] for p in pairs], device),
            score_texts(rm, prompts, [p["rejected"] for p in pairs], device))


def pairwise_accuracy(rm, pairs, device):
    return stages.agreement(*pair_scores(rm, pairs, device))


KINDS = re.compile(rf"\b({'|'.join(data.NAMES + data.ANIMALS + data.PLACES)})\b")  # what a retold twin changes


def is_twin(pair):
    """Do the pair's responses differ only in their names, animals and places (a sample and its retold twin)?"""
    return pair["chosen"] != pair["rejected"] and KINDS.sub("_", pair["chosen"]) == KINDS.sub("_", pair["rejected"])


def by_prompt(pairs):
    """The pairs grouped by prompt, each response once: [(prompt, responses, [(chosen i, rejected i, margin)])]."""
    groups = {}
    for p in pairs:
        responses, comparisons = groups.setdefault(p["prompt"], ({}, []))
        i, j = (responses.setdefault(p[k], len(responses)) for k in ("chosen", "rejected"))
        comparisons.append((i, j, float(p.get("margin", 0.0))))
    return [(prompt, list(responses), comparisons) for prompt, (responses, comparisons) in groups.items()]


def train_reward_model(rm, pairs, cfg, device):
    """Bradley-Terry training, batch_size prompts a step with all their pairs (the first twin_steps: twins alone)."""
    optimizer = stages.make_optimizer(rm, cfg.lr, cfg.weight_decay, device)
    rng = torch.Generator().manual_seed(cfg.seed)
    groups, twins, history = by_prompt(pairs), by_prompt([p for p in pairs if is_twin(p)]), []
    for step in range(cfg.steps):
        t0 = time.time()
        rm.train()
        pool = twins if step < cfg.twin_steps and twins else groups  # the curriculum: the request first
        batch = my_share([pool[i] for i in torch.randint(len(pool), (cfg.batch_size,), generator=rng)])
        # every response of the batch once, in one forward: a prompt's K responses score all its pairs of them
        # (InstructGPT, section 3.5: K forwards instead of two per comparison, and no response seen twice an epoch)
        ids, mask, starts = sft.tokenize_responses(*zip(*[(x, y) for x, ys, _ in batch for y in ys]))  # (R, T): R rows
        with train_autocast(device, cfg.train_dtype):
            scores = rm_scores(rm, to_device(ids, device), to_device(mask, device), starts).float()  # (R,)
        first = [sum(len(ys) for _, ys, _ in batch[:b]) for b in range(len(batch))]  # each prompt's first row
        w, l, m = zip(*[(f + i, f + j, m) for f, (_, _, cs) in zip(first, batch) for i, j, m in cs])  # the pairs
        chosen_rewards, rejected_rewards = scores[list(w)], scores[list(l)]  # (N,), (N,): N pairs
        loss = preference_loss(chosen_rewards, rejected_rewards, scores.new_tensor(m), cfg.label_smoothing)
        check_finite(step, loss=loss)
        stages.optimizer_step(rm, optimizer, loss, stages.lr_at(step, cfg.steps, cfg.lr, warmup=10))
        acc = float((chosen_rewards > rejected_rewards).float().mean())
        row = mean_over_processes({"loss": loss.item(), "accuracy": acc})  # the global batch's
        history.append({"step": step, **row})
        stages.log(step, **row, ms=int(1000 * (time.time() - t0)))
    return history


# ----------------------------------------------------------------------------- judging it: the gold human, and rules

@on_rank_0
def held_out_pairs(policy, cfg, device):
    """(pairs, ceiling): two SFT samples on each of n_eval_pairs held-out prompts, labelled, and how often the labels
    agree with the gold order (the ceiling of any scorer's agreement with the labels)."""
    return label_pairs(policy, sft.eval_prompts(cfg.n_eval_pairs), cfg.tau, cfg.max_new_tokens, device, cfg.seed + 1)


def centre(rm, policy, cfg, device):
    """Centre the reward model on the SFT model's samples of eval_prompts held-out prompts, as InstructGPT normalises
    its reward model: an SFT sample then scores 0 on average. Returns (prompts, samples, their scores before)."""
    torch.manual_seed(cfg.seed + 2)
    prompts = sft.eval_prompts(cfg.eval_prompts)
    texts, *_ = sft.sample(policy, prompts, cfg.max_new_tokens, device=device)
    scores = score_texts(rm, prompts, texts, device)  # (N,)
    # r(x, y) <- r(x, y) - mean_i r(x_i, y_i),  y_i ~ pi_sft(.|x_i): a shift of the head's bias
    with torch.no_grad():
        rm.head.bias -= scores.mean().to(rm.head.bias.device)
    return prompts, texts, scores


def centre_and_evaluate(rm, policy, eval_pairs, ceiling, cfg, device):
    """Centre the reward model (centre), then measure it against the gold human: held-out accuracy (against the
    labels, and over the labeller's coin beside stages.RULES'), by term, the RM-gold correlation, the prompt swap."""
    prompts, texts, scores = centre(rm, policy, cfg, device)
    gold = [data.gold_reward(p, t) for p, t in zip(prompts, texts)]
    chosen, rejected = pair_scores(rm, eval_pairs, device)
    metrics = {"heldout_accuracy": stages.agreement(chosen, rejected), "label_ceiling": ceiling,
               "rm_gold_correlation": stages.pearson(scores, gold)}
    print(" | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    gaps = stages.gold_gaps(eval_pairs)  # g(chosen) - g(rejected)
    metrics["heldout_accuracy_expected"], metrics["label_ceiling_expected"] = stages.expected_accuracy(
        gaps, chosen, rejected, cfg.tau)
    metrics["baselines"] = stages.baselines(eval_pairs, gaps, cfg.tau)
    print("  averaged over the labeller's coin: " + " | ".join(f"{k} {v['expected']:.3f}" for k, v in
          metrics["baselines"].items()) + " | reward model {heldout_accuracy_expected:.3f} | ceiling "
          "{label_ceiling_expected:.3f}".format(**metrics))
    metrics["heldout_by_term"] = stages.accuracy_by_term(eval_pairs, chosen, rejected)
    for term, row in metrics["heldout_by_term"].items():
        print(f"  pairs decided by {term:8s} {row['pairs']:4d} | reward model agrees with gold {row['rm']:.3f} | "
              f"labels {row['labels']:.3f}")
    metrics["prompt_swap"] = stages.prompt_swap(lambda ps, rs: score_texts(rm, ps, rs, device), eval_pairs)
    print("  under another prompt: reward model agrees with gold {right:.3f} -> {swapped:.3f} (drop {drop:.3f}); "
          "the gold human itself 1 -> {gold_swapped:.3f} (drop {gold_drop:.3f})".format(**metrics["prompt_swap"]))
    return metrics


def train(cfg):
    device = pick_device(cfg.device)
    pairs = load_pairs(cfg.data) if cfg.data else None  # a bad file of the user's is reported before any training
    # your pairs: a share of their prompts held out, to judge the reward model on your own labels too
    pairs, yours = stages.split_by_prompt(pairs, cfg.val_frac, cfg.seed) if pairs else (pairs, [])
    policy = load_model(stages.ensure_stage("sft", cfg), device)
    pairs = pairs or load_pairs(stages.ensure_stage("pairs", cfg))
    eval_pairs, ceiling = held_out_pairs(policy, cfg, device)
    print(f"{len(pairs)} training pairs{f', {len(yours)} of yours held out' if cfg.data else ''}; the story world's "
          f"held-out labels agree with its gold order {ceiling:.3f} (the ceiling)")
    torch.manual_seed(cfg.seed + rank())  # each process its own dropout under torchrun
    rm = ScalarHeadModel.from_gpt(policy, cfg.readout).to(device)
    history = train_reward_model(rm, pairs, cfg, device)
    metrics = evaluate_reward_model(rm, policy, pairs, eval_pairs, ceiling, cfg, device, yours)
    stages.save_stage(os.path.join(cfg.out_dir, "reward"), rm, {**metrics, "config": asdict(cfg), "history": history},
                      step=cfg.steps, built_from=stages.record("reward", cfg))
    return metrics


def training_accuracy(rm, pairs, cfg, device):
    """The accuracy on n_eval_pairs training pairs, beside the held-out one: under- or over-fitting."""
    sample = random.Random(cfg.seed).sample(pairs, min(len(pairs), cfg.n_eval_pairs))
    accuracy = pairwise_accuracy(rm, sample, device)
    print(f"  accuracy on {len(sample)} training pairs {accuracy:.3f}")
    return accuracy


@on_rank_0
def evaluate_reward_model(rm, policy, pairs, eval_pairs, ceiling, cfg, device, yours=()):
    """centre_and_evaluate and training_accuracy, by rank 0 alone under torchrun: its reward model is saved. With
    your pairs, the reward model and stages.RULES on yours held out, against your labels (no gold human knows them)."""
    if cfg.data:
        print("the story world's held-out pairs (its SFT samples, its gold human), not yours:")
    metrics = {**centre_and_evaluate(rm, policy, eval_pairs, ceiling, cfg, device),
               "train_accuracy": training_accuracy(rm, pairs, cfg, device)}
    if yours:
        metrics["your_heldout"] = {"pairs": len(yours), "reward model": pairwise_accuracy(rm, yours, device),
                                   **{k: v["accuracy"] for k, v in stages.baselines(yours).items()}}
        print(f"your {len(yours)} held-out pairs agree with your labels: " + " | ".join(
            f"{k} {v:.3f}" for k, v in metrics["your_heldout"].items() if k != "pairs"))
    return metrics


# ----------------------------------------------------------------------------- best-of-N and rejection sampling

@on_rank_0
def best_of_n(policy, rm, prompts, n, max_new_tokens, device):
    """For each prompt, n samples from policy and the one the reward model scores highest.
    Returns (best texts, all texts as a list of n-lists, their RM scores (P, n)); under torchrun rank 0's."""
    texts, *_ = sft.sample(policy, [p for p in prompts for _ in range(n)], max_new_tokens, device=device,
                           batch_size=256)
    scores = score_texts(rm, [p for p in prompts for _ in range(n)], texts, device).view(len(prompts), n)  # (P, n)
    groups = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    best = [g[int(j)] for g, j in zip(groups, scores.argmax(1))]
    return best, groups, scores


def best_of_n_curve(policy, rm, prompts, cfg, device):
    """Mean gold reward of best-of-N for N = 1, 2, 4, ..., bon_max_n, next to its KL to the policy. Sample 1 of each
    prompt is the SFT model's evaluation sample (sft.evaluate at seed cfg.seed, as ppo.py and dpo.py draw it), so
    best-of-1 is the SFT row itself; best-of-N picks among the first N."""
    t0 = time.time()
    _, first = sft.evaluate(policy, prompts, cfg.max_new_tokens, device, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 3)
    _, rest, rest_scores = best_of_n(policy, rm, prompts, cfg.bon_max_n - 1, cfg.max_new_tokens, device)
    groups = [[f] + g for f, g in zip(first, rest)]
    scores = torch.cat([score_texts(rm, prompts, first, device)[:, None], rest_scores], 1)  # (P, bon_max_n)
    curve = []
    for n in [2 ** i for i in range(int(math.log2(cfg.bon_max_n)) + 1)]:  # 1, 2, 4, ..., at most bon_max_n
        pick = scores[:, :n].argmax(1)  # (P,) best of the first n samples
        best = [g[int(j)] for g, j in zip(groups, pick)]
        gold = [data.gold_reward(p, b) for p, b in zip(prompts, best)]
        follow = [data.follows(p, b) for p, b in zip(prompts, best)]
        # KL(pi_bon || pi) = log N - (N - 1) / N, the analytic value for N samples
        curve.append({"n": n, "gold_reward": sum(gold) / len(gold), "follow_rate": sum(follow) / len(follow),
                      "rm_score": float(scores[:, :n].max(1).values.mean()), "kl": math.log(n) - (n - 1) / n,
                      "win_rate_vs_sft": sft.win_rate(prompts, best, first)})
        print("best-of-{n:<3d} | gold {gold_reward:+.3f} | follow {follow_rate:.3f} | rm {rm_score:+.3f} | "
              "kl {kl:.3f}".format(**curve[-1]))
    print(f"best-of-N curve in {time.time() - t0:.0f}s")
    return curve


def best_of_n_stage(cfg):
    """Best-of-N as a method of its own, no training: best_of_n_curve on the first bon_prompts held-out prompts ->
    out/best_of_n/metrics.json (under torchrun rank 0 samples, and writes)."""
    device = pick_device(cfg.device)
    rm = load_model(stages.ensure_stage("reward", cfg), device)
    policy = load_model(stages.ensure_stage("sft", cfg), device)
    metrics = {"best_of_n": best_of_n_curve(policy, rm, sft.eval_prompts(cfg.bon_prompts), cfg, device),
               "config": asdict(cfg), "built_from": stages.record("best_of_n", cfg)}
    if rank() == 0:
        stages.write_metrics(os.path.join(cfg.out_dir, "best_of_n"), metrics)
    barrier()
    return metrics


def rejection_sampling(cfg):
    """LLaMA-2's rejection sampling: best-of-rs_n SFT samples on training prompts become new SFT data."""
    device = pick_device(cfg.device)
    rm = load_model(stages.ensure_stage("reward", cfg), device)
    sft_path = stages.ensure_stage("sft", cfg)
    sft_model, policy = load_model(sft_path, device), load_model(sft_path, device)
    tasks = data.tasks("train", cfg.rs_prompts, seed=cfg.seed + 4)
    prompts = [data.alpaca_prompt(i, x) for i, x in tasks]
    torch.manual_seed(cfg.seed + 4)
    best, _, _ = best_of_n(policy, rm, prompts, cfg.rs_n, cfg.max_new_tokens, device)
    demos = [{"instruction": i, "input": x, "output": b} for (i, x), b in zip(tasks, best)]
    examples, rs_cfg = data.sft_tensors(demos, policy.config.block_size), replace(cfg, batch_size=cfg.rs_batch_size)
    history = sft.finetune(policy, examples, cfg.rs_steps, cfg.lr, rs_cfg, device, tag="rs")
    eval_prompts = sft.eval_prompts(cfg.eval_prompts)
    metrics, texts, sft_texts = sft.compare_with_sft(policy, sft_model, eval_prompts, cfg.max_new_tokens, device,
                                                     cfg.seed)
    metrics["train_gold_best_of_n"] = sum(data.gold_reward(p, b) for p, b in zip(prompts, best)) / len(best)
    stages.report("rejection", metrics, eval_prompts, texts, sft_texts)
    stages.save_stage(os.path.join(cfg.out_dir, "rejection"), policy,
                      {**metrics, "config": asdict(cfg), "history": history}, step=cfg.rs_steps,
                      built_from=stages.record("rejection", cfg))
    return metrics


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails."""
    yield one_of(cfg, "stage", "reward", "best_of_n", "rejection")
    yield one_of(cfg, "readout", "mean", "last")
    yield interval(cfg, "label_smoothing", "[0, 0.5)")  # at 0.5 a label says nothing
    yield interval(cfg, "val_frac", "[0, 1)")
    yield from files_or_empty(cfg, "data")
    yield from run_fields(cfg)
    yield from positive(cfg, "n_prompts", "n_eval_pairs", "tau", "steps", "batch_size", "lr", "max_new_tokens",
                        "eval_prompts", "bon_prompts", "bon_max_n", "rs_prompts", "rs_n", "rs_steps", "rs_batch_size")
    yield "k", cfg.k >= 2, ">= 2: a pair needs two samples"
    yield "bon_max_n", cfg.bon_max_n >= 2, ">= 2: best-of-N compares the SFT sample with at least one more"
    yield from non_negative(cfg, "weight_decay", "twin_steps")
    yield sft.enough_prompts(cfg, "n_prompts", "train", cfg.seed)
    yield sft.enough_prompts(cfg, "rs_prompts", "train", cfg.seed + 4)
    for field in ("n_eval_pairs", "eval_prompts", "bon_prompts"):  # each drawn by sft.eval_prompts
        yield sft.enough_prompts(cfg, field, "eval", sft.EVAL_SEED)
    yield sft.fits_sft_model(cfg)


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    with one_line_errors(), data_parallel(cfg, "batch_size"):
        {"reward": train, "best_of_n": best_of_n_stage, "rejection": rejection_sampling}[cfg.stage](cfg)


if __name__ == "__main__":
    main()
