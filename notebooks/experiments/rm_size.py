"""
Reward-model size: reward models narrower and wider than the policy, and PPO against each (issue 15; seed 002
says the reward model works best near the policy's size).

Each reward model starts from an SFT model of its own width: pretrained and fine-tuned exactly as the policy was
(`python sft.py --n_embd=<width>`, same data, same steps), since InstructGPT initialises the reward model from an
SFT model. Everything else is shared: every reward model trains on the policy's own preference pairs
(out/reward/pairs.jsonl, samples of the policy), with reward.py's recipe, is centred on the policy's SFT samples,
and is measured on the same held-out pairs of the policy's samples (reward.held_out_pairs). Then the policy (the
out/sft model) is trained with ppo.py's recipe against each, its critic starting as that reward model.

The policy's own width is the chain's out/reward and out/ppo, read as they are.

Run:  python notebooks/experiments/rm_size.py [--widths=64,192]     -> out/rm_size/results.json and table.md
"""
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the root
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # notebooks/, for lecture.py

import frontier  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import stages  # noqa: E402
from model import ScalarHeadModel, load_model  # noqa: E402
from runs import pick_device  # noqa: E402
from stages import run_fields  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out"
    """where the chain is read (built if missing) and out/rm_size is written"""
    preset: str = "auto"
    """small, medium, or auto (medium on CUDA): the preset of every stage's Config"""
    device: str = "auto"
    widths: str = "64,192"
    """n_embd of the reward models besides the policy's own, comma-separated"""


def check(cfg):
    yield from run_fields(cfg)
    yield "widths", all(w.strip().isdigit() and int(w) % 4 == 0 for w in cfg.widths.split(",")), \
        "comma-separated multiples of 4 (the preset's n_head)"


def row(width, params, rm, ppo_metrics, seconds):
    swap = rm["prompt_swap"]
    return dict(width=width, params=params, seconds=round(seconds),
                gap=100 * (rm["label_ceiling_expected"] - rm["heldout_accuracy_expected"]),
                drop=100 * swap["drop"], gold_drop=100 * swap["gold_drop"],
                follow_pairs=rm["heldout_by_term"].get("follow", {}).get("rm"),
                **{k: ppo_metrics[k] for k in ("gold_reward", "gold_reward_sft", "follow_rate", "follow_rate_sft", "kl",
                                               "win_rate_vs_sft")})


def markdown_table(rows):
    lines = ["| reward model | gap to ceiling (points) | prompt-swap drop (gold's) | PPO gold (SFT) | PPO follow (SFT) "
             "| KL | win rate vs SFT |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['width']} wide, {r['params'] / 1e6:.2f}M | {r['gap']:.1f} | {r['drop']:.1f} "
                     f"({r['gold_drop']:.1f}) | {r['gold_reward']:+.2f} ({r['gold_reward_sft']:+.2f}) | "
                     f"{r['follow_rate']:.3f} ({r['follow_rate_sft']:.3f}) | {r['kl']:.2f} | "
                     f"{r['win_rate_vs_sft']:.3f} |")
    return "\n".join(lines) + "\n"


def train(cfg, rcfg=None, pcfg=None, scfg=None):
    """Every width. rcfg, pcfg, scfg: reward.py's, ppo.py's and sft.py's configs (default: stages.stage_config, their
    preset's on cfg.out_dir); each width's SFT model is scfg with only n_embd and out_dir changed."""
    device = pick_device(cfg.device)
    rcfg, pcfg = rcfg or stages.stage_config("reward", cfg), pcfg or stages.stage_config("ppo", cfg)
    scfg = scfg or stages.stage_config("sft", cfg)
    sft_path, rm_path = stages.ensure_stage("sft", rcfg), stages.ensure_stage("reward", rcfg)
    policy = load_model(sft_path, device)
    pairs = reward.load_pairs(stages.ensure_stage("pairs", rcfg))
    eval_pairs, ceiling = reward.held_out_pairs(policy, rcfg, device)  # the same pairs reward.py measured on
    # the policy's own width: the chain's reward model and PPO run
    with open(os.path.join(os.path.dirname(rm_path), "metrics.json")) as f:
        own_rm = json.load(f)
    if not os.path.exists(os.path.join(cfg.out_dir, "ppo", "metrics.json")):
        ppo.train(pcfg)
    with open(os.path.join(cfg.out_dir, "ppo", "metrics.json")) as f:
        own_ppo = json.load(f)
    rows = [row(policy.config.n_embd, policy.num_params(), own_rm, own_ppo, 0)]
    for width in [int(w) for w in cfg.widths.split(",")]:
        t0, folder = time.time(), os.path.join(cfg.out_dir, "rm_size", f"w{width}")
        # 1. an SFT model of this width, trained as the policy was: the reward model's starting point
        start = load_model(stages.ensure_stage("sft", replace(scfg, out_dir=folder, n_embd=width)), device)
        # 2. the reward model, on the policy's pairs, centred on and measured against the policy's samples
        torch.manual_seed(rcfg.seed)
        rm = ScalarHeadModel.from_gpt(start, rcfg.readout).to(device)
        reward.train_reward_model(rm, pairs, rcfg, device)
        rm_metrics = reward.centre_and_evaluate(rm, policy, eval_pairs, ceiling, rcfg, device)
        # 3. PPO of the policy against it; the critic starts as this reward model
        critic = copy.deepcopy(rm)
        ppo_metrics = ppo.train(replace(pcfg, out_dir=os.path.join(folder, "policy")),
                                policy=load_model(sft_path, device), ref=load_model(sft_path, device), critic=critic,
                                reward_fn=ppo.rm_reward_fn(rm.requires_grad_(False).eval()))
        rows.append(row(width, start.num_params(), rm_metrics, ppo_metrics, time.time() - t0))
        print(markdown_table(rows))
    rows.sort(key=lambda r: r["width"])
    frontier.save_rows(os.path.join(cfg.out_dir, "rm_size"), rows, markdown_table(rows))
    return rows


if __name__ == "__main__":
    frontier.run_experiment(Config, check, train, markdown_table)
