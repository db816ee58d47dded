"""
The InstructGPT claim as checks, each judged on the worst seed (issue 21's bounds), from seeds' rows of
notebooks/experiments/figures/seeds.json (notebooks/experiments/seeds.py writes them):

  SFT           follow rate >= 0.60
  reward model  prompt-swap drop >= 0.60 of the gold human's own; expected accuracy within 8 points of the ceiling
  PPO, DPO      follow rate >= 15 points over SFT; win rate over SFT >= 0.78; KL <= 3 nats
  PPO           win rate spread over the seeds (max - min) <= 0.08

Follow rates, win rates and KLs are expectations over several samples a prompt where a seed has them
(seeds.expectations), since one draw of 256 samples moves a rate by about 0.03. notebooks/experiments/results.py
renders these tables into the README and RESULTS.md; the lecture notebooks print them from the same records.
"""


def gap(rm):
    """A reward model's points under the labels' ceiling, from its metrics (reward.centre_and_evaluate's)."""
    return 100 * (rm["label_ceiling_expected"] - rm["heldout_accuracy_expected"])


def drop_share(rm):
    """A reward model's prompt-swap drop over the gold human's own, from its metrics; None where gold's is 0."""
    swap = rm["prompt_swap"]
    return swap["drop"] / swap["gold_drop"] if swap["gold_drop"] else None


def expected(r, method, key):
    """A method's follow rate, win rate over SFT or KL as an expectation over several samples a prompt where the
    seed has it (seeds.py's expectations), else its one draw as the stage measured it."""
    if key in r.get("expected", {}).get(method, {}):
        return r["expected"][method][key]
    return r["ppo"]["follow_rate_sft"] if method == "sft" else r[method][key]


def gain(r, method):
    return 100 * (expected(r, method, "follow_rate") - expected(r, "sft", "follow_rate"))


# issue-style checks of the InstructGPT claim, each judged on the worst seed: (what, function of a row, >= or <=, bound)
CHECKS = [
    ("SFT follow rate", lambda r: expected(r, "sft", "follow_rate"), ">=", 0.60),
    ("reward model: prompt-swap drop / the gold human's", lambda r: drop_share(r["reward"]), ">=", 0.60),
    ("reward model: points under the labels' ceiling", lambda r: gap(r["reward"]), "<=", 8.0),
    ("PPO: follow rate over SFT (points)", lambda r: gain(r, "ppo"), ">=", 15.0),
    ("PPO: win rate vs SFT", lambda r: expected(r, "ppo", "win_rate_vs_sft"), ">=", 0.78),
    ("PPO: KL (nats)", lambda r: expected(r, "ppo", "kl"), "<=", 3.0),
    ("DPO: follow rate over SFT (points)", lambda r: gain(r, "dpo"), ">=", 15.0),
    ("DPO: win rate vs SFT", lambda r: expected(r, "dpo", "win_rate_vs_sft"), ">=", 0.78),
    ("DPO: KL (nats)", lambda r: expected(r, "dpo", "kl"), "<=", 3.0),
]


def worst(xs, op):
    return min(xs) if op == ">=" else max(xs)


def judged(rows):
    """Each check judged on the worst seed: [(what, op, bound, worst, mean or None, holds)], the PPO win rate's
    spread over the seeds last (when there are several)."""
    out = []
    for what, f, op, bound in CHECKS:
        xs = [x for x in map(f, rows) if x is not None]
        if xs:
            w = worst(xs, op)
            out.append((what, op, bound, w, sum(xs) / len(xs), w >= bound if op == ">=" else w <= bound))
    win = [expected(r, "ppo", "win_rate_vs_sft") for r in rows]
    if len(win) > 1:  # one seed has no spread
        spread_ = max(win) - min(win)
        out.append(("PPO: win-rate spread over the seeds (max - min)", "<=", 0.08, spread_, None, spread_ <= 0.08))
    return out


def checks_table(rows):
    lines = ["| check | bound | worst seed | mean | holds on every seed |", "| --- | ---: | ---: | ---: | --- |"]
    for what, op, bound, w, mean, ok in judged(rows):
        lines.append(f"| {what} | {op} {bound:g} | {w:.3g} | {'' if mean is None else format(mean, '.3g')} | "
                     f"{'yes' if ok else 'no'} |")
    return "\n".join(lines)


def checks_line(rows):
    """The README's line on the checks: which hold on the worst seed and which do not."""
    verdicts = judged(rows)
    said = lambda ok: "; ".join(f"{w} {op} {b:g}" for w, op, b, _, _, o in verdicts if o == ok) or "none"  # noqa: E731
    return (f"Judged on the worst of these seeds (RESULTS.md), the checks of the InstructGPT claim that hold: "
            f"{said(True)}. The ones that do not: {said(False)}.")


def change_table(before_rows, rows):
    """Each check seed by seed, `before -> now`: before_rows the seeds of an earlier recipe, rows today's; then each
    side's worst seed (judged). Only the seeds both have, so a change is judged on the same seeds."""
    seeds = [r["seed"] for r in rows if r["seed"] in {b["seed"] for b in before_rows}]
    old, new = ({r["seed"]: r for r in rs} for rs in (before_rows, rows))
    was, now = ({v[0]: v for v in judged([by[s] for s in seeds])} for by in (old, new))
    per_seed = {what: f for what, f, _, _ in CHECKS}  # the spread has no per-seed value
    lines = [f"| check | bound | {' | '.join(f'seed {s}' for s in seeds)} | worst seed |",
             "| --- | ---: |" + " ---: |" * (len(seeds) + 1)]
    for what, op, bound, worst_before, _, _ in was.values():
        f = per_seed.get(what)
        cells = [f"{f(old[s]):.3g} -> {f(new[s]):.3g}" if f else "" for s in seeds]
        lines.append(f"| {what} | {op} {bound:g} | {' | '.join(cells)} | {worst_before:.3g} -> {now[what][3]:.3g} |")
    return "\n".join(lines)


def seed_changes(before_rows, rows, columns):
    """The lectures' plain-text table of a recipe change, one line a seed that both records have: columns are
    (header, function of a seed's row, format spec), each cell `before -> today`."""
    old = {r["seed"]: r for r in before_rows}
    lines = [f"{'seed':>5} | " + " | ".join(f"{h:^16}" for h, _, _ in columns)]
    for r in (r for r in rows if r["seed"] in old):
        lines.append(f"{r['seed']:>5} | " + " | ".join(f"{f(old[r['seed']]):{s}} -> {f(r):{s}}" for _, f, s in columns))
    return "\n".join(lines)
