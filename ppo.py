"""
Stage 3b: RLHF with PPO against the reward model (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

Each step samples responses to training prompts from the policy pi, scores them with the reward model, and takes
a few epochs of clipped policy-gradient steps (Schulman et al. 2017) on them:

  per-token reward   r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) + score * [t = last real token]
  GAE                delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lam * A_{t+1}
  policy loss        L_pg = E_t[ max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) ]
  value loss         L_vf = E_t[ 0.5 * max((V - R_t)^2, (V_clipped - R_t)^2) ],   R_t = A_t + V_old(s_t)
  adaptive beta      beta <- beta * (1 + clip((KL - KL_target) / KL_target, -0.2, 0.2) * n / horizon),
                     never below kl_coef_floor times where it starts

Without a critic (--advantage=rloo or grpo), G samples per prompt and one advantage per sample, on every token:
  sequence reward    r_i = score_i - beta * sum_t kl_t                  (the same objective as the per-token one)
  RLOO               A_i = r_i - mean_{j != i} r_j                      (Ahmadian et al. 2024)
  GRPO               A_i = (r_i - mean_j r_j) / std_j r_j               (Shao et al. 2024, DeepSeekMath)

Symbols: B rollouts a step, P prompt length (left-padded), R response length (right-padded after EOS), s_t the
prompt and the first t response tokens, a_t the t-th response token, pi_ref the frozen SFT model.

Choices (notebooks/GUIDE.md says more about each):
  - the KL penalty is the k1 estimator kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t) on the policy's own samples:
    summed over a response it is the sequence log-ratio, an unbiased estimate of KL(pi || pi_ref) that is also a
    per-token reward the critic can learn (Schulman, "Approximating KL divergence", 2020).
  - the critic is a separate ScalarHeadModel initialised from the reward model (InstructGPT, section 3.5).
  - advantages are whitened over the real tokens of the whole batch; rewards are not (reward.py centres the RM).
  - a response that never emits EOS within max_new_tokens has its score lowered by no_eos_penalty.
  - dropout off (the first minibatch's ratio is exactly 1), no entropy bonus, a constant lr (lm-human-preferences).
  - RLOO and GRPO keep the KL in the reward (summed over the response), so all three optimise the same
    reward - beta * KL and the frontier compares advantage estimators, not objectives.
  - --reward=gold trains against the gold human itself, paid gold_scale * g: the oracle line on the frontier.

Run:  python ppo.py                  (builds missing earlier stages, then out/ppo/model.pt and metrics.json)
      python ppo.py --advantage=rloo --group_size=4 --out_dir=out_rloo    (no critic; the same for grpo)
      python ppo.py --reward=gold --out_dir=out_gold                     (RL on the gold human itself)
      python ppo.py --init=rejection                 (start from reward.py --stage=rejection's model, as LLaMA-2)
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import data
import reward
import sft
import stages
from model import load_model, token_logprobs
from runs import (all_reduce_sum, autocast, check_finite, data_parallel, mean_over_processes, my_share,
                  one_line_errors, parse_config, pick_device, rank)
from stages import StageConfig, interval, non_negative, one_of, positive, run_fields


@dataclass
class Config(StageConfig):
    steps: int = 40
    """PPO iterations: one rollout batch and its optimisation epochs each"""
    batch_size: int = 64
    """B: rollouts (prompts, one response each) per step"""
    n_epochs: int = 2
    """optimisation passes over each rollout batch (K in Schulman et al. 2017)"""
    n_minibatches: int = 2
    """minibatches per epoch; each holds batch_size / n_minibatches rollouts"""
    max_new_tokens: int = 120
    """longest response; one without EOS by then is penalised"""
    lr: float = 1e-4
    """policy learning rate (constant)"""
    critic_lr: float = 1e-4
    """critic learning rate (constant)"""
    max_grad_norm: float = 1.0
    kl_coef: float = 0.3
    """beta in r_t = -beta * kl_t + score * [t = last]; with adaptive_kl, where beta starts"""
    adaptive_kl: bool = True
    """adapt beta towards target_kl (Ziegler et al. 2019, section 2.2); False keeps beta fixed (InstructGPT)"""
    target_kl: float = 2.5
    """KL_target: the sequence KL the adaptive controller aims for (nats)"""
    kl_horizon: int = 200
    """horizon H of the adaptive controller in rollouts (Ziegler et al. used 10000 over far longer runs)"""
    kl_coef_floor: float = 1.0
    """the controller never lowers beta below kl_coef_floor * kl_coef: 1 only raises it, 0 is Ziegler et al.'s"""
    gamma: float = 1.0
    """gamma, discount per token"""
    lam: float = 0.95
    """lambda of GAE (Schulman et al. 2016)"""
    cliprange: float = 0.2
    """epsilon in clip(ratio, 1 - eps, 1 + eps)"""
    cliprange_value: float = 0.2
    """how far V may move from V_old before the value loss is clipped"""
    no_eos_penalty: float = 1.0
    """subtracted from the score of a response that never emits EOS"""
    n_prompts: int = 4000
    """pool of training prompts (data.tasks "train", disjoint from the held-out ones)"""
    eval_prompts: int = 256
    """held-out prompts for the gold-human evaluation"""
    sample_every: int = 10
    """print one rollout every this many steps"""
    advantage: str = "gae"
    """gae: the critic and GAE; rloo or grpo: no critic, G samples per prompt compared with each other"""
    group_size: int = 4
    """G: samples per prompt for rloo and grpo (batch_size / G prompts a step); gae samples one per prompt"""
    reward: str = "model"
    """model: the reward model; gold: the gold human itself (data.gold_reward), an oracle"""
    gold_scale: float = 2.0
    """--reward=gold pays gold_scale * g: 2 = 1 / reward.py's tau, the scale a Bradley-Terry RM learns g on"""
    init: str = "sft"
    """the model PPO starts from: sft, or rejection (LLaMA-2's order: rejection sampling first); pi_ref stays SFT"""


PRESETS = {"small": {}, "medium": dict(steps=60)}  # sft.PRESETS says what they are


# ----------------------------------------------------------------------------- the math, as pure functions

def masked_mean(x, mask):
    """Mean of x over the positions where mask is 1."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x, mask):
    """(x - mean) / std over the positions where mask is 1, those of every process under torchrun."""
    def mean(y):  # masked_mean over every process's positions
        total, count = all_reduce_sum(torch.stack([(y * mask).sum(), mask.sum()]))
        return total / count.clamp(min=1)
    mask = mask.to(x.dtype)
    mu = mean(x)
    return (x - mu) * torch.rsqrt(mean((x - mu) ** 2) + 1e-8)


def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Ziegler et al. 2019's reward: a KL penalty on every token plus the score on the last real token.
    scores (B,); logprobs, ref_logprobs, mask (B, R), each row's mask ones then zeros (the response up to its EOS).
    Returns (rewards, non_score_reward, kl), each (B, R), zero on padding."""
    if not (mask[:, 1:] <= mask[:, :-1]).all() or not mask[:, 0].all():
        raise ValueError("per_token_rewards: each row's mask must be ones, then zeros (at least one real token)")
    mask = mask.to(logprobs.dtype)
    # k1 estimator of the per-token KL: kl_t = log pi(a_t|s_t) - log pi_ref(a_t|s_t)
    kl = (logprobs - ref_logprobs) * mask  # (B, R)
    # r_t = -beta * kl_t + score * [t = last real token]
    non_score_reward = -kl_coef * kl  # (B, R)
    last = mask.sum(1).long() - 1  # (B,) index of the last real token (the EOS, if there is one)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, non_score_reward, kl


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016): rewards, values, mask (B, R), the episode ending
    after each row's last real token. Returns (advantages, returns), each (B, R), zero on padding."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # past the end: no reward, V = 0
    advantages = torch.zeros_like(values)  # (B, R)
    lastgaelam = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    R = values.size(1)
    for t in reversed(range(R)):
        next_values = values[:, t + 1] if t + 1 < R else torch.zeros_like(values[:, 0])  # (B,) 0 after the end
        # delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        # A_t = delta_t + gamma * lam * A_{t+1}
        lastgaelam = (delta + gamma * lam * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    # R_t = A_t + V(s_t): the value target
    returns = advantages + values
    return advantages, returns


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) as a loss, averaged over real tokens.
    All inputs (B, R). Returns (pg_loss, approx_kl, clipfrac), scalars."""
    # ratio_t = pi_theta(a_t|s_t) / pi_old(a_t|s_t) = exp(log pi_theta - log pi_old)
    logratio = logprobs - old_logprobs  # (B, R)
    ratio = logratio.exp()
    # L = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)): the pessimistic side of the two
    pg_loss1 = -advantages * ratio  # (B, R)
    pg_loss2 = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    with torch.no_grad():
        # approx KL(pi_old || pi_theta) = E[(ratio - 1) - log ratio] (k3: always >= 0)
        approx_kl = masked_mean((ratio - 1) - logratio, mask)
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
    return pg_loss, approx_kl, clipfrac


def value_loss(values, old_values, returns, mask, cliprange_value):
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2) averaged over real tokens.
    All inputs (B, R). Returns (vf_loss, vf_clipfrac)."""
    # V_clipped = V_old + clip(V - V_old, -eps_v, eps_v)
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)  # (B, R)
    vf_loss1 = (values - returns) ** 2  # (B, R)
    vf_loss2 = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    # clipped where |V - V_old| > eps_v and the clipped loss is the larger (V_clipped equals V elsewhere, up to a
    # rounding error that must not count)
    clipped = ((values - old_values).abs() > cliprange_value) & (vf_loss2 > vf_loss1)
    vf_clipfrac = masked_mean(clipped.float(), mask).detach()
    return vf_loss, vf_clipfrac


def group_advantages(seq_rewards, group_size, kind):
    """One advantage per sample from the other samples of its prompt, no critic: seq_rewards (B,) in groups of
    group_size consecutive rows; kind "rloo" or "grpo". Returns (B,)."""
    r = seq_rewards.view(-1, group_size)  # (B/G, G)
    if kind == "rloo":
        # A_i = r_i - mean_{j != i} r_j, with mean_{j != i} r_j = (sum_j r_j - r_i) / (G - 1)
        baseline = (r.sum(1, keepdim=True) - r) / (group_size - 1)
        return (r - baseline).view(-1)
    # A_i = (r_i - mean_j r_j) / std_j r_j   (the sample std; a group whose rewards all tie gets 0)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)


def update_kl_coef(kl_coef, kl, target, n_steps, horizon, floor=0.0):
    """Ziegler et al. 2019's adaptive controller: beta up when the mean sequence KL is above target, down (to at
    least floor) when below; n_steps: rollouts since the last update."""
    # e = clip((KL - KL_target) / KL_target, -0.2, 0.2);  beta <- max(beta * (1 + e * n / H), floor)
    proportional_error = min(max((kl - target) / target, -0.2), 0.2)
    return max(kl_coef * (1 + proportional_error * n_steps / horizon), floor)


def entropy_from_logits(logits):
    """H(pi(.|s_t)) = logsumexp(z) - sum_v softmax(z)_v z_v: logits (B, R, V) -> (B, R)."""
    logits = logits.float()
    return torch.logsumexp(logits, -1) - (F.softmax(logits, -1) * logits).sum(-1)


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over real tokens: 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_diff = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_diff / var_returns.clamp(min=1e-8))


# ----------------------------------------------------------------------------- rollouts

def response_logits(model, ids, attention_mask, P):
    """The logits that predict each response token: position P-1+t predicts ids[:, P+t]. -> (B, R, V)."""
    logits, _ = model(ids, attention_mask=attention_mask)  # (B, P+R, V)
    return logits[:, P - 1:-1]


@torch.no_grad()
def rollout(policy, ref, critic, reward_fn, prompt_ids, max_new_tokens, kl_coef, no_eos_penalty, device):
    """Sample one response per prompt and compute everything PPO needs from it.
    prompt_ids: list of 1-d token tensors. Returns a dict of tensors; (B, ...) rows, R response columns."""
    eot = data.special(data.EOT)
    # 1. sample responses from the policy (left-padded prompts, KV cache; rows stop at EOS, padded with EOS)
    query, query_mask = (t.to(device) for t in data.pad_left(prompt_ids, eot))  # (B, P)
    P = query.size(1)
    with autocast(device):
        ids = policy.generate(query, max_new_tokens, eos_token_id=eot, attention_mask=query_mask)  # (B, P+R)
    response = ids[:, P:]  # (B, R)
    is_eos = response == eot
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # (B, R) real tokens: up to and including the 1st EOS
    ended = is_eos.any(1)  # (B,)
    attention_mask = torch.cat([query_mask, mask], 1)  # (B, P+R)
    # 2. log pi, log pi_ref of the sampled tokens and V(s_t) before each one
    with autocast(device):
        logprobs = token_logprobs(response_logits(policy, ids, attention_mask, P), response)  # (B, R)
        ref_logprobs = token_logprobs(response_logits(ref, ids, attention_mask, P), response)  # (B, R)
        values = torch.zeros_like(logprobs) if critic is None else critic(ids, attention_mask)[:, P - 1:-1].float()
        # 3. score the whole response with the reward function (the reward model by default)
        raw_scores = reward_fn(ids, attention_mask, P).float()  # (B,)
    # 4. penalise responses that never emit EOS
    scores = raw_scores - no_eos_penalty * (~ended).float()  # (B,)
    # 5. per-token rewards r_t = -beta * kl_t + score * [t = last]
    rewards, non_score_reward, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    return dict(ids=ids, attention_mask=attention_mask, P=P, response=response, mask=mask, ended=ended,
                logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, raw_scores=raw_scores,
                scores=scores, rewards=rewards, non_score_reward=non_score_reward, kl=kl)


def response_texts(batch):
    """The sampled responses as text, without their EOS."""
    return [data.decode(r[:int(m.sum()) - int(e)].tolist())
            for r, m, e in zip(batch["response"].cpu(), batch["mask"].cpu(), batch["ended"].cpu())]


def rm_reward_fn(rm):
    """The reward model as a reward_fn(ids, attention_mask, P) -> (B,) (reward.rm_scores; responses start at P)."""
    return lambda ids, attention_mask, P: reward.rm_scores(rm, ids, attention_mask, P)


def gold_reward_fn(ids, attention_mask, P):
    """The gold human as a reward_fn: data.gold_reward of each row's prompt and response text, EOS left out."""
    eot, scores = data.special(data.EOT), []
    for row, real in zip(ids.tolist(), attention_mask.tolist()):
        prompt = [t for t, m in zip(row[:P], real[:P]) if m]
        response = [t for t, m in zip(row[P:], real[P:]) if m and t != eot]
        scores.append(data.gold_reward(data.decode(prompt), data.decode(response)))
    return torch.tensor(scores, device=ids.device)


# ----------------------------------------------------------------------------- PPO

def ppo_step(policy, critic, policy_opt, critic_opt, batch, cfg, gen):
    """n_epochs passes of minibatch updates on one rollout batch. Returns the mean of each logged statistic."""
    device = batch["ids"].device
    mask = batch["mask"]
    if cfg.advantage == "gae":
        # 6. advantages and returns by GAE, then whiten the advantages over real tokens (of every process's batch)
        advantages, returns = compute_gae(batch["rewards"], batch["values"], mask, cfg.gamma, cfg.lam)  # (B, R)
        advantages = masked_whiten(advantages, mask)
    else:
        # 6'. one advantage per sample against the others of its prompt, on each of its tokens
        seq_advantages = group_advantages(batch["rewards"].sum(1), cfg.group_size, cfg.advantage)  # (B,)
        advantages = seq_advantages[:, None] * mask  # (B, R)
    B, P, mb_size = mask.size(0), batch["P"], mask.size(0) // cfg.n_minibatches
    stats = {k: [] for k in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "vf_clipfrac", "entropy")}
    for epoch in range(cfg.n_epochs):
        perm = torch.randperm(B, generator=gen).to(device)
        for start in range(0, mb_size * cfg.n_minibatches, mb_size):
            mb_inds = perm[start:start + mb_size]
            mb_ids, mb_attn, mb_mask = batch["ids"][mb_inds], batch["attention_mask"][mb_inds], mask[mb_inds]
            # 7. policy: clipped surrogate on the new log pi(a_t|s_t)
            with autocast(device):
                logits = response_logits(policy, mb_ids, mb_attn, P)  # (mb, R, V)
            new_logprobs = token_logprobs(logits, batch["response"][mb_inds])  # (mb, R)
            pg_loss, approx_kl, clipfrac = policy_loss(new_logprobs, batch["logprobs"][mb_inds],
                                                       advantages[mb_inds], mb_mask, cfg.cliprange)
            stages.optimizer_step(policy, policy_opt, pg_loss, cfg.lr, cfg.max_grad_norm)
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), mb_mask)
            for k, v in dict(pg_loss=pg_loss, approx_kl=approx_kl, clipfrac=clipfrac, entropy=entropy).items():
                stats[k].append(v.item())
            if critic is None:
                continue
            # 8. critic: clipped regression of V(s_t) on the returns
            with autocast(device):
                new_values = critic(mb_ids, mb_attn)[:, P - 1:-1].float()  # (mb, R)
            vf_loss, vf_clipfrac = value_loss(new_values, batch["values"][mb_inds], returns[mb_inds], mb_mask,
                                              cfg.cliprange_value)
            stages.optimizer_step(critic, critic_opt, vf_loss, cfg.critic_lr, cfg.max_grad_norm)
            stats["vf_loss"].append(vf_loss.item())
            stats["vf_clipfrac"].append(vf_clipfrac.item())
    out = {k: sum(v) / len(v) for k, v in stats.items() if v}
    if critic is not None:
        out["explained_var"] = explained_variance(batch["values"], returns, mask)
    return out


def start_models(cfg, device, policy=None, ref=None, critic=None, reward_fn=None):
    """What PPO starts from (--init, --advantage, --reward): the policy, pi_ref (SFT), the critic (the reward model;
    None for rloo and grpo) and the reward function; the ones not passed in are loaded, or built first."""
    needs_critic = cfg.advantage == "gae"
    if cfg.reward == "gold" and reward_fn is None:
        reward_fn = lambda ids, attention_mask, P: cfg.gold_scale * gold_reward_fn(ids, attention_mask, P)  # noqa: E731
    if None in (policy, ref, reward_fn) or (needs_critic and critic is None):
        rm_path = stages.ensure_stage("reward", cfg)  # also builds out/sft
        sft_path = stages.ensure_stage("sft", cfg)
        policy = load_model(stages.ensure_stage(cfg.init, cfg), device) if policy is None else policy
        ref = load_model(sft_path, device) if ref is None else ref
        if needs_critic and critic is None:
            critic = load_model(rm_path, device)  # the critic starts as the RM
        if reward_fn is None:
            rm = load_model(rm_path, device).requires_grad_(False).eval()
            reward_fn = rm_reward_fn(rm)
    critic = critic.to(device).eval() if needs_critic else None
    return policy.to(device).eval(), ref.to(device).requires_grad_(False).eval(), critic, reward_fn


def train(cfg, policy=None, ref=None, critic=None, reward_fn=None):
    """PPO from the SFT model against the reward model; start_models loads what is not passed in (tests pass a tiny
    GPT and a toy reward_fn(ids, attention_mask, P) -> (B,)). Returns the final metrics."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed + rank())  # under torchrun each process samples rollouts of its own
    policy, ref, critic, reward_fn = start_models(cfg, device, policy, ref, critic, reward_fn)  # critic None: rloo
    policy_opt = stages.make_optimizer(policy, cfg.lr, 0.0, device)
    critic_opt = None if critic is None else stages.make_optimizer(critic, cfg.critic_lr, 0.0, device)

    prompts = sft.train_prompts(cfg.n_prompts, cfg.seed)
    prompt_ids = [torch.tensor(data.encode(p)) for p in prompts]
    eval_prompts = sft.eval_prompts(cfg.eval_prompts)
    sft_eval, sft_texts = sft.evaluate(ref, eval_prompts, cfg.max_new_tokens, device, seed=cfg.seed)
    print(f"sft: {json.dumps(sft_eval)}")

    gen, kl_coef, history = torch.Generator().manual_seed(cfg.seed), cfg.kl_coef, []
    floor = cfg.kl_coef_floor * cfg.kl_coef  # the adaptive controller never lowers beta below this
    for step in range(cfg.steps):
        t0 = time.time()
        group = 1 if cfg.advantage == "gae" else cfg.group_size  # G samples of each prompt, in consecutive rows
        pick = torch.randint(len(prompts), (cfg.batch_size // group,), generator=gen).repeat_interleave(group).tolist()
        pick = my_share(pick)  # under torchrun this process's rollouts: whole groups (main() checks the batch)
        batch = rollout(policy, ref, critic, reward_fn, [prompt_ids[i] for i in pick], cfg.max_new_tokens,
                        kl_coef, cfg.no_eos_penalty, device)
        check_finite(step, score=batch["raw_scores"], reward=batch["rewards"])
        stats = ppo_step(policy, critic, policy_opt, critic_opt, batch, cfg, gen)
        check_finite(step, pg_loss=stats["pg_loss"], vf_loss=stats.get("vf_loss", 0.0))
        texts = response_texts(batch)
        row = dict(step=step, score=float(batch["raw_scores"].mean()),
                   gold=sum(data.gold_reward(prompts[i], t) for i, t in zip(pick, texts)) / len(texts),
                   follow=sum(data.follows(prompts[i], t) for i, t in zip(pick, texts)) / len(texts),
                   kl=float(batch["kl"].sum(1).mean()), kl_coef=kl_coef,  # kl: k1 summed over each response
                   non_score_reward=float(batch["non_score_reward"].sum(1).mean()),
                   eos_rate=float(batch["ended"].float().mean()), length=float(batch["mask"].sum(1).float().mean()),
                   **stats, ms=int(1000 * (time.time() - t0)))
        # under torchrun the mean over the processes' equal shares: the whole batch's numbers, in every process
        row.update(mean_over_processes({k: v for k, v in row.items() if k not in ("step", "kl_coef", "ms")}))
        history.append(row)
        stages.log(step, **{k: v for k, v in row.items() if k not in ("step", "non_score_reward", "vf_clipfrac")})
        if cfg.sample_every and step % cfg.sample_every == 0:
            print(f"  sample: {texts[0]!r}")
        if cfg.adaptive_kl:
            kl_coef = update_kl_coef(kl_coef, row["kl"], cfg.target_kl, cfg.batch_size, cfg.kl_horizon, floor)

    metrics, texts, _ = sft.compare_with_sft(policy, ref, eval_prompts, cfg.max_new_tokens, device, cfg.seed,
                                             sft_eval=(sft_eval, sft_texts))
    stages.report("ppo", metrics, eval_prompts, texts, sft_texts)
    stages.save_stage(os.path.join(cfg.out_dir, "ppo"), policy, {**metrics, "config": asdict(cfg), "history": history},
                      step=cfg.steps, built_from=stages.record("ppo", cfg))
    return {**metrics, "history": history}


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails."""
    yield from run_fields(cfg)
    yield from positive(cfg, "steps", "batch_size", "n_epochs", "n_minibatches", "max_new_tokens", "lr", "critic_lr",
                        "max_grad_norm", "target_kl", "kl_horizon", "cliprange_value", "n_prompts", "eval_prompts",
                        "gold_scale")
    yield "n_minibatches", cfg.batch_size % cfg.n_minibatches == 0, f"a divisor of --batch_size={cfg.batch_size}"
    yield from non_negative(cfg, "kl_coef", "kl_coef_floor", "no_eos_penalty", "sample_every")
    yield interval(cfg, "gamma", "[0, 1]")
    yield interval(cfg, "lam", "[0, 1]")
    yield interval(cfg, "cliprange", "(0, 1)")
    yield one_of(cfg, "advantage", "gae", "rloo", "grpo")
    yield one_of(cfg, "reward", "model", "gold")
    yield one_of(cfg, "init", "sft", "rejection")
    grouped = cfg.advantage != "gae"  # gae samples one response a prompt: group_size is not used
    yield "group_size", not grouped or cfg.group_size >= 2, ">= 2: a sample is compared with the others of its prompt"
    divides = cfg.group_size > 0 and cfg.batch_size % cfg.group_size == 0
    yield "group_size", not grouped or divides, f"a divisor of --batch_size={cfg.batch_size}"
    yield sft.enough_prompts(cfg, "n_prompts", "train", cfg.seed)
    yield sft.enough_prompts(cfg, "eval_prompts", "eval", sft.EVAL_SEED)
    yield sft.fits_sft_model(cfg)


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    group = 1 if cfg.advantage == "gae" else cfg.group_size  # a process's share: whole minibatches, whole groups
    with one_line_errors(), data_parallel(cfg, "batch_size", math.lcm(cfg.n_minibatches, group)):
        t0 = time.time()
        train(cfg)
        stages.time_lines(cfg, "ppo", time.time() - t0)  # one line a stage the chain built, and the total


if __name__ == "__main__":
    main()
