"""
Reward-model levers: what closes the gap between the reward model and its labels, measured on the seeds' chains.

PPO's gain follows its reward model, so the InstructGPT result holds on every seed only if every seed's reward model
learns the request: within 8 points of the labels' ceiling, with a prompt-swap drop of at least 60% of the gold human's
own (notebooks/experiments/RESULTS.md judges both on the worst seed). reward.py's defaults miss both on every seed of
notebooks/experiments/seeds.py, and they under-fit: the reward model gets its own training pairs right little more often
than held-out ones. Each lever here is one reward model per seed, trained on that seed's SFT model and pairs
(out/seeds/<preset>/seed<s>/, built by notebooks/experiments/seeds.py) with reward.py's training loop and measured
exactly as reward.py measures it, on the same held-out pairs. The row `recipe` is each seed's reward model as the chain
built it. The shipped rows were measured while a step was 8 pairs drawn at random; a step is now batch_size
prompts with all their pairs (reward.by_prompt), so a steps= lever of theirs meant other numbers then.

  steps=2560        two passes over the ~10,000 pairs instead of one (reward.py's --steps; 8 pairs a step then)
  margin=small      LLaMA-2's margin loss -log sigmoid(r_w - r_l - m(grade)) (Touvron et al. 2023, eq. 2), the
  margin=large      labeller's grade of each preference mapped to m as in their appendix A.3.3: small (0, 1/3, 2/3,
  margin=none       1), large (0, 1, 2, 3) for negligibly, slightly, clearly, significantly better; none: m = 0,
                    the plain Bradley-Terry loss on the same pairs (the recipe's own pairs carry small margins)
  tau=0.25          a less noisy labeller: the training pairs relabelled by reward.graded_label at this tau, the
                    held-out pairs labelled afresh with it (so the ceiling moves too)
  lr=2e-3           any other field of reward.Config, as --field=value would set it; data=<pairs.jsonl> trains
                    on that file's pairs (another seed's: is it the pairs or the SFT model that sets the gap?)
  twins=one         the pairs sampled again with a twin that differs from its sample in one request (retold_once:
                    one requested name, animal or place, drawn at random, met where the story missed it or missed
                    where it met it) instead of reward.retold's twin that meets all of them or none;
  twins=both        both twins: the reward model must check each request, not only all of them at once
  n_prompts=2000    more pairs (any of the pairs stage's fields, n_prompts or k): sampled again from the SFT model
  ensemble=3        K reward models on the same pairs, each with its own seed of the head and of the batches
                    (member 0 is the recipe's own), scored by their mean r(x, y) = 1/K sum_k r_k(x, y) (Coste et
                    al. 2023); each member is measured too, as the row `ensemble=3#k`: the spread within one seed

The graded labeller is reward.graded_label: the simulated human perceives z = g(a) - g(b) + tau * eps, eps ~
Logistic(0, 1), prefers a when z > 0 (the Bradley-Terry labeller) and grades |z| (under 0.5, 1.5, 3 and above).
The recipe's pairs carry those grades since the margin became the recipe; a margin lever here grades the pairs
again, each pair's z drawn given the choice the labeller made (z > 0 for the chosen response): the same joint
distribution of labels and grades. The rows above were measured on chains whose pairs had no grades.

Run:  python notebooks/experiments/rm_levers.py [--seeds=1337,3,4] [--variants="margin=none;twin_steps=0"]
      -> out/rm_levers/results.json (a (seed, variant) done before is reused);
         `notebooks/experiments/results.py --update` ships it as notebooks/experiments/figures/rm_levers.json and
         renders it into notebooks/experiments/RESULTS.md
"""
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, replace

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the root
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # notebooks/, for lecture.py

import torch  # noqa: E402

import data  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import stages  # noqa: E402
from frontier import names, run_experiment  # noqa: E402
from checks import drop_share, gap  # noqa: E402
from model import ScalarHeadModel, load_model  # noqa: E402
from runs import atomic_write, parse_config, pick_device  # noqa: E402
from stages import run_fields  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out"
    """the seeds' chains are read from <out_dir>/seeds/<preset>/seed<s>/; the levers go to <out_dir>/rm_levers/"""
    preset: str = "small"
    """the preset of the seeds' chains"""
    device: str = "auto"
    seeds: str = "1337,3,4"
    """comma-separated seeds, each with a chain built by notebooks/experiments/seeds.py"""
    variants: str = "steps=1280,twin_steps=0,margin=none;margin=none;twin_steps=0"
    """levers, separated by ';': each a comma-separated list of field=value (reward.Config's fields, or margin);
    the default takes the recipe apart: the reward model before it, without the margin, without the curriculum"""
    threads: int = 1
    """torch threads: the seeds' chains were built on one"""


MARGINS = {"small": reward.MARGINS, "large": (0.0, 1.0, 2.0, 3.0), "none": (0.0,) * 4}  # LLaMA-2, appendix A.3.3
GRADES = reward.GRADES  # |z| below each: negligibly, slightly, clearly better; above the last: significantly


def check(cfg):
    yield from run_fields(cfg)
    yield "seeds", all(s.isdigit() for s in names(cfg.seeds)) and bool(names(cfg.seeds)), "comma-separated integers"
    yield "variants", all(parse_variant(v) is not None for v in cfg.variants.split(";")), \
        "levers separated by ';', each field=value,... with reward.Config's fields or margin=small|large|none"
    yield "threads", cfg.threads >= 0, ">= 0"


def parse_variant(text):
    """'margin=small,steps=2560' -> {"margin": "small", "steps": 2560} (values typed as reward.Config's), or None."""
    out = {}
    for item in names(text):
        key, _, value = item.partition("=")
        if key == "margin" and value in MARGINS:
            out[key] = value
        elif key == "twins" and value in TWINS:
            out[key] = value
        elif key == "ensemble" and value.isdigit() and int(value) >= 2:
            out[key] = int(value)
        elif key in reward.Config.__dataclass_fields__ and value:
            try:
                out[key] = type(getattr(reward.Config, key))(value)
            except ValueError:
                return None
        else:
            return None
    return out or None


def retold_once(prompt, text, rng):
    """The same story with one request flipped: one requested name, animal or place, drawn at random, becomes
    another of its kind where the story is about it (data.requests_met), and every word of its kind becomes it where
    the story is not. The two texts differ in that one request only."""
    want = data.requested(prompt)
    if not want:
        return text
    w = rng.choice(want)
    kind = next(k for k in (data.NAMES, data.ANIMALS, data.PLACES) if w in k)
    said = set(re.findall(r"[A-Za-z]+", text))
    if w in said and not (said & set(kind)) - {w}:  # about w (as data.requests_met counts it): now about another
        return re.sub(rf"\b{w}\b", rng.choice([x for x in kind if x != w]), text)
    return re.sub(rf"\b({'|'.join(kind)})\b", w, text)  # not about w: now about it


TWINS = {"one": (retold_once,), "both": (reward.retold, retold_once)}


def perceived_difference(gold_gap, tau, u):
    """z = g(chosen) - g(rejected) + tau * eps given z > 0, from one uniform u in [0, 1): eps is drawn from the
    logistic distribution above -gold_gap / tau by its inverse CDF: eps = logit(F + (1 - F) u), with
    F = sigmoid(-gold_gap / tau)."""
    # z = gap + tau * logit(F + (1 - F) u), F = sigmoid(-gap / tau): eps ~ Logistic(0, 1) given gap + tau eps > 0
    lo = 0.5 * (1 + math.tanh(-gold_gap / (2 * tau)))  # sigmoid(-gap / tau), without overflow
    q = lo + (1 - lo) * u
    return gold_gap + tau * math.log(q / (1 - q)) if 0 < q < 1 else (math.inf if q >= 1 else gold_gap)


def graded(pairs, tau, levels, seed):
    """The pairs with LLaMA-2's margin m(grade) of each preference, the grade drawn as the module docstring says."""
    rng, out = random.Random(seed), []
    for p in pairs:
        gap = data.gold_reward(p["prompt"], p["chosen"]) - data.gold_reward(p["prompt"], p["rejected"])
        z = abs(perceived_difference(gap, tau, rng.random()))
        # m = levels[grade], grade = how many of the thresholds GRADES |z| reaches (0: negligibly better ... 3)
        out.append({**p, "margin": levels[sum(z >= g for g in GRADES)]})
    return out


def relabelled(pairs, tau, seed):
    """The pairs labelled again by the simulated human at temperature tau (each pair's two responses, in their
    stored order, are a and b of reward.graded_label)."""
    rng, out = random.Random(seed), []
    for p in pairs:
        a, b = p["chosen"], p["rejected"]
        keep = reward.graded_label(data.gold_reward(p["prompt"], a), data.gold_reward(p["prompt"], b), tau, rng)[0]
        out.append({**p, "chosen": a if keep else b, "rejected": b if keep else a})
    return out


class Ensemble(torch.nn.Module):
    """K reward models as one: r(x, y) = 1/K sum_k r_k(x, y), plus a shift that centring sets (head.bias, as on a
    ScalarHeadModel, so reward.centre_and_evaluate centres it)."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config  # the members' readout (model.rm_scores)
        self.head = torch.nn.Module()
        self.head.bias = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, idx, attention_mask=None):
        # r(x, y) = 1/K sum_k r_k(x, y)
        return torch.stack([m(idx, attention_mask) for m in self.members]).mean(0) + self.head.bias  # (B, T)


def row(seed, name, rm):
    return dict(seed=seed, variant=name, gap=gap(rm), drop_share=drop_share(rm), train_accuracy=rm["train_accuracy"],
                heldout_accuracy_expected=rm["heldout_accuracy_expected"],
                follow_pairs=rm["heldout_by_term"].get("follow", {}).get("rm"), seconds=rm.get("seconds"),
                pairs=rm.get("pairs"))


def lever(folder, seed, variant, cfg, device, held_out):
    """One reward model on a seed's chain with the variant's settings: its metrics as reward.train measures them
    (the best-of-N curve aside), with the seconds its training took. held_out: {(seed, tau): what
    reward.held_out_pairs returned}, filled as the levers need it."""
    argv = [f"--preset={cfg.preset}", f"--out_dir={folder}", f"--seed={seed}", f"--device={cfg.device}"]
    own = ("margin", "ensemble", "twins")  # the levers of this experiment; the rest are reward.Config's fields
    flags = [f"--{k}={v}" for k, v in variant.items() if k not in own]
    rcfg = parse_config(reward.Config, argv + flags, reward.PRESETS, reward.check, quiet=True)
    policy = load_model(stages.output_path("sft", folder), device)
    if {"twins", "n_prompts", "k"} & variant.keys():  # pairs sampled again from the SFT model, as the lever says
        prompts = sft.train_prompts(rcfg.n_prompts, rcfg.seed)
        pairs, _ = reward.label_pairs(policy, prompts, rcfg.tau, rcfg.max_new_tokens, device, rcfg.seed, rcfg.k,
                                      TWINS[variant["twins"]] if "twins" in variant else rcfg.retell)
    else:  # data=<pairs.jsonl>: another file's pairs (another seed's, say) on this seed's SFT model
        pairs = reward.load_pairs(rcfg.data or stages.output_path("pairs", folder))
    if "tau" in variant:
        pairs = relabelled(pairs, rcfg.tau, seed)
    if "margin" in variant:
        pairs = graded(pairs, rcfg.tau, MARGINS[variant["margin"]], seed)
    if (seed, rcfg.tau) not in held_out:  # the pairs the chain's reward model was measured on (at its tau)
        held_out[seed, rcfg.tau] = reward.held_out_pairs(policy, rcfg, device)
    eval_pairs, ceiling = held_out[seed, rcfg.tau]
    members, t0 = [], time.time()
    for k in range(variant.get("ensemble", 1)):  # member k: seed + 1000 k for its head and its batches
        torch.manual_seed(rcfg.seed + 1000 * k)  # as reward.train seeds the reward model's training
        members.append(ScalarHeadModel.from_gpt(policy, rcfg.readout).to(device))
        reward.train_reward_model(members[-1], pairs, replace(rcfg, seed=rcfg.seed + 1000 * k), device)
    seconds = time.time() - t0
    measure = lambda rm: {**reward.centre_and_evaluate(rm, policy, eval_pairs, ceiling, rcfg, device),  # noqa: E731
                          "train_accuracy": reward.training_accuracy(rm, pairs, rcfg, device)}
    if len(members) == 1:
        return {**measure(members[0]), "seconds": round(seconds), "pairs": len(pairs)}
    each = [measure(m) for m in members]  # each member centred on its own: their mean is centred too
    return {**measure(Ensemble(members)), "seconds": round(seconds), "pairs": len(pairs), "members": each}


def train(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, path = pick_device(cfg.device), os.path.join(cfg.out_dir, "rm_levers", "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"preset": cfg.preset, "rows": []}
    done, held_out = {(r["seed"], r["variant"]) for r in results["rows"]}, {}
    for seed in [int(s) for s in names(cfg.seeds)]:
        folder = os.path.join(cfg.out_dir, "seeds", cfg.preset, f"seed{seed}")
        with open(os.path.join(folder, "reward", "metrics.json")) as f:
            todo = [("recipe", None, json.load(f))]  # the chain's own reward model: today's recipe
        todo += [(v, parse_variant(v), None) for v in cfg.variants.split(";")]
        for name, variant, metrics in todo:
            if (seed, name) in done:
                continue
            print(f"== seed {seed}: {name}")
            metrics = metrics or lever(folder, seed, variant, cfg, device, held_out)
            results["rows"].append(row(seed, name, metrics))
            results["rows"] += [row(seed, f"{name}#{k}", m) for k, m in enumerate(metrics.get("members", ()))]
            done.add((seed, name))
            with atomic_write(path) as f:
                json.dump(results, f, indent=1)
    return results


# ----------------------------------------------------------------------------- the table RESULTS.md shows

def levers_table(results):
    """notebooks/experiments/rm_levers.py's table, one row per lever and a column per seed: the gap to the ceiling (points) and
    the drop share of each seed's reward model, then the worst of each over the seeds the lever was tried on, and
    the mean seconds of training. A lever is compared with the recipe seed by seed, not by means over other seeds."""
    seeds = sorted({r["seed"] for r in results["rows"]})
    lines = [f"| reward model | {' | '.join(f'seed {s}: gap, drop share' for s in seeds)} | worst gap | "
             "worst drop share | seconds a seed |", "| --- |" + " ---: |" * (len(seeds) + 3)]
    for v in dict.fromkeys(r["variant"] for r in results["rows"]):
        rows = {r["seed"]: r for r in results["rows"] if r["variant"] == v}
        share = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731  (None: the gold human tied every pair)
        cells = [f"{rows[s]['gap']:.1f}, {share(rows[s]['drop_share'])}" if s in rows else "" for s in seeds]
        shares = [r["drop_share"] for r in rows.values() if r["drop_share"] is not None]
        seconds = [r["seconds"] for r in rows.values()]
        lines.append(f"| {lever_name(v)} | {' | '.join(cells)} | {max(r['gap'] for r in rows.values()):.1f} | "
                     f"{share(min(shares) if shares else None)} | "
                     f"{'-' if None in seconds else format(sum(seconds) / len(seconds), '.0f')} |")
    lines += ["", f"Smaller gap and larger drop share than the recipe's on every seed tried: {better_levers(results)}."]
    return "\n".join(lines)


def lever_name(variant):
    """A lever as the table names it: data=<a seed's pairs.jsonl> as "data=seed <s>'s pairs"."""
    return re.sub(r"data=\S*?seed(\d+)/reward/pairs\.jsonl", r"data=seed \1's pairs", variant)


def better_levers(results):
    """The levers whose reward model beats the recipe's on both counts on each seed they were tried on, in words."""
    recipe = {r["seed"]: r for r in results["rows"] if r["variant"] == "recipe"}
    out = []
    for v in dict.fromkeys(r["variant"] for r in results["rows"] if r["variant"] != "recipe"):
        rows = [r for r in results["rows"] if r["variant"] == v and r["seed"] in recipe]
        share = lambda r: r["drop_share"] or 0.0  # noqa: E731  (None: the gold human tied every pair)
        if rows and all(r["gap"] < recipe[r["seed"]]["gap"] and share(r) > share(recipe[r["seed"]]) for r in rows):
            out.append(f"{lever_name(v)} ({len(rows)} seed{'s' * (len(rows) != 1)})")
    return ", ".join(out) or "none"


BEFORE_TITLE = "Reward-model levers, on the chains before the recipe changed"
BEFORE_NOTE = ("These chains' pairs had no grades and their reward model no curriculum: 1280 steps of the plain "
               "Bradley-Terry loss (the row `recipe`); a margin lever graded their pairs afresh. These are the runs "
               "that chose the margin and two passes over the pairs; the twin curriculum was chosen after them, on "
               "the seeds' chains (`notebooks/experiments/rm_levers.py`'s default levers take today's recipe apart).")


def levers_section(levers, title="Reward-model levers, on the seeds' own chains", note=""):
    """RESULTS.md's section on notebooks/experiments/rm_levers.py: reward models trained otherwise on the seeds' own chains."""
    seeds = sorted({r["seed"] for r in levers["rows"]})
    return "\n".join([f"## {title}", "", *([note, ""] if note else []),
                      f"`python notebooks/experiments/rm_levers.py` (the {levers['preset']} preset; seeds "
                      f"{', '.join(map(str, seeds))}): each lever is one reward model a seed, trained on that seed's "
                      "SFT model and pairs and measured on its held-out pairs as reward.py measures it; an ensemble "
                      "is scored by its K members' mean, and each member is a row of its own (`#k`, member 0 the "
                      "chain's own); `data=seed s's pairs` trains on seed s's pairs instead. `recipe` is the chain's "
                      "own reward model, as in the table above. The bounds: a gap of at most 8 points and a drop "
                      "share of at least 0.60, on every seed. `seconds a seed`: the training alone (all members), on "
                      "one thread while another run shared the cores.", "", levers_table(levers), ""])


if __name__ == "__main__":
    run_experiment(Config, check, train, levers_table)
