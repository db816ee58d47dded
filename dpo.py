"""
Stage 4 without a reward model: Direct Preference Optimization (DPO; Rafailov et al. 2023).

The RLHF objective max_pi E[r(x, y)] - beta KL(pi || pi_ref) has the closed-form optimum
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x)  (DPO eq. 4). Solved for r and put into the Bradley-Terry model
of the preferences, Z(x) cancels and the reward model becomes a classifier on the policy's own log-probabilities:

  implicit reward   r_hat(x, y) = beta * log pi(y|x) / pi_ref(y|x)                                       (Section 4)
  h                 = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)      y_w chosen, y_l rejected
  DPO (sigmoid)     L = -log sigmoid(beta h)                                                               (eq. 7)
  conservative DPO  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)    labels flipped with prob eps
                                                                                    (Mitchell 2023)
  IPO               L = (h - 1 / (2 beta))^2              (Azar et al. 2023, the sampled IPO loss; their tau is beta)
  + NLL             L + alpha * (-log pi(y_w|x) / |y_w|)    the chosen response's per-token NLL (RPO: Pang et al.
                                                            2024, eq. 3): keeps y_w, and its EOS, likely

log pi(y|x) is the sum over the response's tokens (its EOS included) of log pi(y_t | x, y_<t).

The pairs are the ones the reward model was trained on (stage "pairs"): two responses sampled from the SFT
model per prompt, labelled by reward.py's noisy simulated labeller. So the data come from pi_ref = pi_SFT, the
setting the paper recommends (Section 4), and the policy starts from the SFT model too.

Departures from the paper:
  - the reference log-probs of every pair are computed once before training (pi_ref is frozen): half the forwards.
  - AdamW with stages.lr_at's warm-up and cosine decay, not RMSprop at a constant rate; batches drawn with
    replacement, as in sft.py.
  - IPO on summed log-probs, like the sigmoid loss (Azar et al. write the loss for whole sequences, too; some
    libraries use per-token means instead, which changes what beta means).
  - pairs are held out by prompt to report the implicit reward's accuracy on preferences it never saw.

Run:  python dpo.py [--loss_type=ipo] [--label_smoothing=0.1] [--data=my_pairs.jsonl]
      (builds out/pretrain, out/sft and the preference pairs first if they are missing)
"""
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import reward
import sft
import stages
from model import load_model, sequence_logps
from runs import (autocast, check_finite, data_parallel, mean_over_processes, my_share, one_line_errors,
                  parse_config, pick_device, rank, to_device)
from stages import StageConfig, files_or_empty, interval, non_negative, one_of, positive, run_fields


@dataclass
class Config(StageConfig):
    beta: float = 0.3
    """beta in r_hat(x, y) = beta * log pi(y|x)/pi_ref(y|x): the KL coefficient; larger stays closer to pi_ref"""
    loss_type: str = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta h); ipo: (h - 1/(2 beta))^2 (Azar et al. 2023)"""
    label_smoothing: float = 0.0
    """eps, the assumed probability that a preference label is flipped (conservative DPO); sigmoid loss only"""
    nll_coef: float = 0.0
    """alpha of the chosen response's per-token NLL added to the loss (RPO); 0: DPO alone"""
    data: str = ""
    """a JSONL file of {"prompt", "chosen", "rejected"} pairs (prompt in the Alpaca template); empty: the pairs
    the reward model was trained on"""
    twins: bool = False
    """also train on the retold twin pairs (reward.is_twin: a sample and the same story told about someone else),
    which the reward model's curriculum starts from. Off: only pairs of two responses sampled for their prompt, the
    data DPO assumes (pi_ref's own, Section 4); a twin is a story pi_ref tells about someone else, and pushing its
    log-probability down for this prompt cost the grammar of every story (notebooks/experiments/RESULTS.md, "How
    the recipe came to be")"""
    steps: int = 240
    """optimizer steps: on the sampled pairs alone (twins off) DPO moves less per step, and at 120 steps it stayed
    well inside the KL that PPO spends while its win rate over SFT fell short (notebooks/experiments/RESULTS.md,
    "How the recipe came to be")"""
    batch_size: int = 16
    """preference pairs per step (2 * batch_size sequences in one forward)"""
    lr: float = 1e-4
    """peak learning rate; linear warm-up, cosine decay"""
    warmup: int = 10
    weight_decay: float = 0.0
    """off by default: decay pulls the weights towards zero, not towards pi_ref"""
    val_frac: float = 0.1
    """fraction of the prompts whose pairs are held out for the implicit reward's accuracy"""
    eval_every: int = 20
    """steps between held-out pair evaluations"""
    eval_prompts: int = 256
    """held-out prompts for the gold-human evaluation"""
    max_new_tokens: int = 120


PRESETS = {"small": {}, "medium": dict(steps=360)}  # sft.PRESETS says what they are


# ----------------------------------------------------------------------------- the math

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1,
             label_smoothing=0.0, loss_type="sigmoid"):
    """Per-pair preference loss from sequence log-probs, each (B,). Returns (losses, chosen_rewards,
    rejected_rewards), each (B,); the implicit rewards beta * log pi/pi_ref are detached, for logging."""
    # h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        # L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); eps = 0 is DPO's eq. 7. Its gradient
        # (eps = 0, DPO Section 4):
        #   grad L = -beta E[ sigmoid(r_hat(y_l) - r_hat(y_w)) (grad log pi(y_w|x) - grad log pi(y_l|x)) ]
        # each pair weighted by how wrongly the implicit reward orders it. logsigmoid: no overflow at large |h|.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        # L = (h - 1/(2 beta))^2: regress the log-ratio gap to a finite target instead of pushing it to infinity
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}; valid: sigmoid, ipo")
    # r_hat(x, y) = beta * log pi(y|x)/pi_ref(y|x)
    chosen_rewards = beta * chosen_logratios.detach()  # (B,)
    rejected_rewards = beta * rejected_logratios.detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------- the pairs

def pair_tensors(pairs, block_size):
    """Tokenize each {"prompt", "chosen", "rejected"} record as two examples prompt + response + EOT, labels -1
    on the prompt, cut to block_size. Returns a list of ((ids, labels) chosen, (ids, labels) rejected)."""
    eot = data.special(data.EOT)
    out = []
    for p in pairs:
        prompt = data.encode(p["prompt"])
        out.append((data.example_tensors(prompt, data.encode(p["chosen"]) + [eot], block_size),
                    data.example_tensors(prompt, data.encode(p["rejected"]) + [eot], block_size)))
    return out


def collate(pairs_t, device):
    """A batch of B tokenized pairs as one (2B, T) forward: rows 0..B-1 chosen, rows B..2B-1 rejected."""
    examples = [c for c, _ in pairs_t] + [r for _, r in pairs_t]
    ids = data.pad_right([e[0] for e in examples], data.special(data.PAD))  # (2B, T)
    labels = data.pad_right([e[1] for e in examples], -1)  # (2B, T)
    return to_device(ids, device), to_device(labels, device)


@torch.no_grad()
def reference_logps(ref, pairs_t, device, batch_size=64):
    """log pi_ref(y_w|x) and log pi_ref(y_l|x) of every pair, once: (N, 2)."""
    ref.eval()
    out = []
    for i in range(0, len(pairs_t), batch_size):
        ids, labels = collate(pairs_t[i:i + batch_size], device)  # (2B, T)
        with autocast(device):
            logps = sequence_logps(ref, ids, labels)  # (2B,)
        out.append(torch.stack(logps.chunk(2), dim=1))  # (B, 2)
    return torch.cat(out)


def pair_stats(policy, pairs_t, ref_logps, cfg, device, batch_size=64):
    """Mean loss, implicit-reward accuracy (r_hat(y_w) > r_hat(y_l); a tie, as at step 0, counts as wrong) and
    margin r_hat(y_w) - r_hat(y_l) over the pairs pairs_t with reference log-probs ref_logps (N, 2)."""
    policy.eval()
    losses, acc, margins = [], [], []
    with torch.no_grad():
        for i in range(0, len(pairs_t), batch_size):
            ids, labels = collate(pairs_t[i:i + batch_size], device)
            with autocast(device):
                chosen, rejected = sequence_logps(policy, ids, labels).chunk(2)  # (B,), (B,)
            ref = ref_logps[i:i + batch_size]  # (B, 2)
            l, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing,
                                 cfg.loss_type)
            losses.append(l)
            acc.append((cr > rr).float())
            margins.append(cr - rr)
    return dict(loss=float(torch.cat(losses).mean()), reward_accuracy=float(torch.cat(acc).mean()),
                reward_margin=float(torch.cat(margins).mean()))


# ----------------------------------------------------------------------------- training

def optimize(policy, train_t, train_ref, cfg, device, val_t=(), val_ref=None):
    """cfg.steps of DPO on the tokenized pairs train_t with their reference log-probs train_ref (N, 2).
    Returns the per-step history; every cfg.eval_every steps it also holds the held-out pair statistics."""
    optimizer = stages.make_optimizer(policy, cfg.lr, cfg.weight_decay, device)
    rng = torch.Generator().manual_seed(cfg.seed)
    history = []
    for step in range(cfg.steps):
        t0 = time.time()
        policy.train()
        # 1. a batch of pairs and their precomputed reference log-probs
        idx = my_share(torch.randint(len(train_t), (cfg.batch_size,), generator=rng))  # (B,), B/N under torchrun
        ids, labels = collate([train_t[int(i)] for i in idx], device)  # (2B, T)
        ref = train_ref[idx.to(train_ref.device)]  # (B, 2)
        # 2. log pi(y_w|x) and log pi(y_l|x) in one forward
        with autocast(device):
            chosen_logps, rejected_logps = sequence_logps(policy, ids, labels).chunk(2)  # (B,), (B,)
        # 3. the preference loss, averaged over pairs
        losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref[:, 0], ref[:, 1],
                                                            cfg.beta, cfg.label_smoothing, cfg.loss_type)
        loss = losses.mean()
        if cfg.nll_coef:
            # + alpha * mean_b(-log pi(y_w|x) / |y_w|): rows [0, B) of labels are the chosen responses
            n_tokens = (labels[:len(idx)] != -1).sum(1)  # (B,) |y_w|, its EOS included
            loss = loss + cfg.nll_coef * (-chosen_logps / n_tokens).mean()
        check_finite(step, loss=loss)
        # 4. one AdamW step on theta
        lr = stages.lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        grad_norm = stages.optimizer_step(policy, optimizer, loss, lr)
        # chosen/rejected: beta * log pi/pi_ref, means; both often fall while the margin between them grows. Under
        # torchrun the means over the processes' equal shares: the global batch's
        row = mean_over_processes(dict(
            loss=loss.item(), reward_accuracy=float((chosen_rewards > rejected_rewards).float().mean()),
            reward_margin=float((chosen_rewards - rejected_rewards).mean()),
            chosen_reward=float(chosen_rewards.mean()), rejected_reward=float(rejected_rewards.mean())))
        row.update(grad_norm=grad_norm, lr=lr)
        if len(val_t) and ((step + 1) % cfg.eval_every == 0 or step == cfg.steps - 1):
            row.update({f"val_{k}": v for k, v in pair_stats(policy, val_t, val_ref, cfg, device).items()})
        history.append({"step": step, **row})
        stages.log(step, loss=row["loss"], acc=row["reward_accuracy"], margin=row["reward_margin"],
                chosen=row["chosen_reward"], rejected=row["rejected_reward"],
                **({"val_acc": row["val_reward_accuracy"]} if "val_reward_accuracy" in row else {}),
                ms=int(1000 * (time.time() - t0)))
    return history


def train(cfg, policy=None, ref=None):
    """DPO from the SFT model on the preference pairs; writes out/dpo/model.pt and out/dpo/metrics.json. policy and
    ref (pi_ref) can be passed in instead of loaded from out/sft, as in ppo.train."""
    device = pick_device(cfg.device)
    pairs = reward.load_pairs(cfg.data or stages.ensure_stage("pairs", cfg))
    pairs = pairs if cfg.twins else [p for p in pairs if not reward.is_twin(p)]
    sft_path = stages.ensure_stage("sft", cfg) if policy is None or ref is None else None
    torch.manual_seed(cfg.seed + rank())  # each process its own dropout under torchrun
    policy = load_model(sft_path, device) if policy is None else policy.to(device)
    ref = load_model(sft_path, device) if ref is None else ref.to(device)  # pi_ref: the frozen SFT model
    ref.requires_grad_(False)
    train_pairs, val_pairs = stages.split_by_prompt(pairs, cfg.val_frac, cfg.seed)
    train_t = pair_tensors(train_pairs, policy.config.block_size)
    val_t = pair_tensors(val_pairs, policy.config.block_size)
    if not train_t:
        raise ValueError(f"no training pairs left after holding out {cfg.val_frac:.0%} of the prompts")
    print(f"dpo ({cfg.loss_type}, beta {cfg.beta}) on {len(train_t)} pairs, {len(val_t)} held out; "
          f"{policy.num_params() / 1e6:.2f}M parameters")
    train_ref = reference_logps(ref, train_t, device)  # (N, 2)
    val_ref = reference_logps(ref, val_t, device) if val_t else None
    history = optimize(policy, train_t, train_ref, cfg, device, val_t, val_ref)

    # the gold human on held-out prompts, against the SFT model's samples of the same prompts
    prompts = sft.eval_prompts(cfg.eval_prompts)
    metrics, texts, sft_texts = sft.compare_with_sft(policy, ref, prompts, cfg.max_new_tokens, device, cfg.seed)
    last = history[-10:]  # implicit-reward accuracy and margin on the last 10 training batches
    metrics.update({k: sum(h[k] for h in last) / len(last) for k in ("reward_accuracy", "reward_margin")})
    metrics.update({k: v for k, v in history[-1].items() if k.startswith("val_")})  # held-out pairs, final step
    stages.report("dpo", metrics, prompts, texts, sft_texts)
    metrics.update(config=asdict(cfg), history=history)
    stages.save_stage(os.path.join(cfg.out_dir, "dpo"), policy, metrics, step=cfg.steps,
                      built_from=stages.record("dpo", cfg))
    return metrics


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails."""
    yield from positive(cfg, "beta")  # beta < 0 would reverse every preference
    yield one_of(cfg, "loss_type", "sigmoid", "ipo")
    yield interval(cfg, "label_smoothing", "[0, 0.5)")  # eps = 0.5 is a coin flip; above it, labels reversed
    yield "label_smoothing", cfg.loss_type == "sigmoid" or cfg.label_smoothing == 0, "0 with --loss_type=ipo"
    yield from files_or_empty(cfg, "data")
    yield from run_fields(cfg)
    yield from positive(cfg, "steps", "batch_size", "lr", "eval_every", "eval_prompts", "max_new_tokens")
    yield from non_negative(cfg, "warmup", "weight_decay", "nll_coef")
    yield interval(cfg, "val_frac", "[0, 1)")
    yield sft.enough_prompts(cfg, "eval_prompts", "eval", sft.EVAL_SEED)
    yield sft.fits_sft_model(cfg)


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    with one_line_errors(), data_parallel(cfg, "batch_size"):
        train(cfg)


if __name__ == "__main__":
    main()
