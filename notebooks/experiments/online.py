"""
Iterated online RLHF (Bai et al. 2022, section 4.5): the reward model keeps learning from the policy it scores.

The offline recipe trains the reward model once, on SFT samples, and PPO then moves the policy away from what the
reward model has seen. The online recipe splits PPO into rounds; after each round but the last,

  1. the current policy answers n_prompts fresh training prompts twice (and each answer is retold, as reward.py's
     pairs are), and the simulated labeller labels those pairs: P(a > b) = sigmoid((g(a) - g(b)) / tau)
  2. they join the reward model's data, and the reward model trains on all of it for rm_steps more steps
     (-log sigmoid(r_w - r_l), reward.py's recipe), is centred again on SFT samples and measured on the held-out pairs
  3. PPO continues from where it stopped, against the updated reward model (a new optimiser each round)

Both arms start from the same SFT model, reward model and critic, and take the same number of PPO steps in all;
each round is evaluated by the gold human on the same held-out prompts (gold reward, KL from SFT, follow rate).

Run:  python notebooks/experiments/online.py [--rounds=3] [--steps=42]     -> out/online/results.json and table.md
"""
import os
import sys
from dataclasses import dataclass, replace

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the root
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # notebooks/, for lecture.py

import frontier  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import stages  # noqa: E402
from model import load_model  # noqa: E402
from runs import pick_device  # noqa: E402
from stages import positive, run_fields  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out"
    """where the chain is read (built if missing) and out/online is written"""
    preset: str = "auto"
    device: str = "auto"
    rounds: int = 3
    """rounds of the online arm; the offline arm is one round of the same total steps"""
    steps: int = 42
    """PPO steps in all, split evenly over the rounds"""
    n_prompts: int = 300
    """fresh training prompts a round, each answered twice by the current policy and labelled"""
    rm_steps: int = 320
    """reward-model steps a round, on all its data so far"""


def check(cfg):
    yield from run_fields(cfg)
    yield from positive(cfg, "rounds", "steps", "n_prompts", "rm_steps")
    yield "steps", cfg.steps % cfg.rounds == 0, f"a multiple of --rounds={cfg.rounds}"


def run_arm(name, rounds, cfg, rcfg, pcfg, device):
    """One arm: `rounds` rounds of PPO, the reward model updated on the policy's samples between them.
    Returns one row per round."""
    sft_path, rm_path = stages.ensure_stage("sft", rcfg), stages.ensure_stage("reward", rcfg)
    sft_model = load_model(sft_path, device)
    policy, ref, critic = load_model(sft_path, device), load_model(sft_path, device), load_model(rm_path, device)
    rm = load_model(rm_path, device).requires_grad_(False).eval()
    pairs = reward.load_pairs(stages.ensure_stage("pairs", rcfg))
    eval_pairs, ceiling = reward.held_out_pairs(sft_model, rcfg, device)
    rows = []
    for k in range(rounds):
        run_cfg = replace(pcfg, steps=cfg.steps // rounds, seed=pcfg.seed + k,
                          out_dir=os.path.join(cfg.out_dir, "online", f"{name}_round{k + 1}"))
        metrics = ppo.train(run_cfg, policy=policy, ref=ref, critic=critic, reward_fn=ppo.rm_reward_fn(rm))
        rows.append(dict(arm=name, round=k + 1, steps=(k + 1) * run_cfg.steps, pairs=len(pairs),
                         **{key: metrics[key] for key in ("gold_reward", "gold_reward_sft", "follow_rate", "kl",
                                                          "win_rate_vs_sft")}))
        if k == rounds - 1:
            break
        # 1. the current policy's answers to fresh prompts, labelled
        prompts = sft.train_prompts(cfg.n_prompts, rcfg.seed + 100 + k)
        new, agreement = reward.label_pairs(policy, prompts, rcfg.tau, rcfg.max_new_tokens, device,
                                            seed=rcfg.seed + 100 + k, k=2, retell=rcfg.retell)
        pairs = pairs + new
        print(f"== round {k + 1}: {len(new)} new pairs from the policy (labels agree with gold {agreement:.3f})")
        # 2. the reward model trains on all its data, then is centred and measured again
        rm.requires_grad_(True)
        reward.train_reward_model(rm, pairs, replace(rcfg, steps=cfg.rm_steps, seed=rcfg.seed + 100 + k), device)
        rm_metrics = reward.centre_and_evaluate(rm, sft_model, eval_pairs, ceiling, rcfg, device)
        rm.requires_grad_(False).eval()
        rows[-1]["rm_accuracy_after"] = rm_metrics["heldout_accuracy_expected"]
    return rows


def markdown_table(rows):
    lines = ["| arm | round | PPO steps so far | RM pairs | gold (SFT) | follow rate | KL | win rate vs SFT |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['round']} | {r['steps']} | {r['pairs']} | {r['gold_reward']:+.2f} "
                     f"({r['gold_reward_sft']:+.2f}) | {r['follow_rate']:.3f} | {r['kl']:.2f} | "
                     f"{r['win_rate_vs_sft']:.3f} |")
    return "\n".join(lines) + "\n"


def train(cfg, rcfg=None, pcfg=None):
    """Both arms. rcfg and pcfg: reward.py's and ppo.py's configs (default: stages.stage_config, their preset's on
    cfg.out_dir)."""
    device = pick_device(cfg.device)
    rcfg, pcfg = rcfg or stages.stage_config("reward", cfg), pcfg or stages.stage_config("ppo", cfg)
    rows = run_arm("offline", 1, cfg, rcfg, pcfg, device) + run_arm("online", cfg.rounds, cfg, rcfg, pcfg, device)
    frontier.save_rows(os.path.join(cfg.out_dir, "online"), rows, markdown_table(rows))
    return rows


if __name__ == "__main__":
    frontier.run_experiment(Config, check, train, markdown_table)
