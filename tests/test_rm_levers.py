"""notebooks/rm_levers.py: the graded labeller against a naive simulation of the labeller it stands for, the
variants' parsing, and the experiment end to end on a tiny seed chain (the recipe's row is the chain's own reward
model; a lever's row is trained again, and a second run reuses the first's rows)."""
import json
import math
import os
import random
import sys

import data
import reward
from test_seeds import TINY, tiny_presets  # noqa: F401  (the fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks"))
import rm_levers  # noqa: E402
import seeds  # noqa: E402


def test_perceived_difference_hand_worked():
    # gap 0, tau 0.5: F = sigmoid(0) = 0.5; u = 0.5 -> q = 0.75 -> z = 0.5 * log(0.75 / 0.25) = 0.5 * log 3
    assert math.isclose(rm_levers.perceived_difference(0.0, 0.5, 0.5), 0.5 * math.log(3))
    # the chosen response always looked better: z > 0, also for a label that went against the gold order
    for gap in (-6.0, -1.0, 0.0, 2.0):
        assert all(rm_levers.perceived_difference(gap, 0.5, u / 100) > -1e-9 for u in range(100))  # 0 up to rounding


def test_grades_match_a_naive_graded_labeller():
    # the labeller the grades stand for: z = gap + tau * eps, eps ~ Logistic(0, 1), prefers a when z > 0, grades |z|.
    # Simulated naively (draw eps, keep the draws that chose a) its grades must match rm_levers.graded's on a pair
    # whose chosen response is a, for a gap in the gold order and one against it
    tau, n, rng = 0.5, 20000, random.Random(0)
    prompt = data.alpaca_prompt(*data.tasks("train", 1, seed=0)[0])
    for a, b in (("Tom the cat went to the park. The end.", "Tom the cat went to the park."),
                 ("Tom the cat went to the park.", "Tom the cat went to the park. The end.")):
        gap = data.gold_reward(prompt, a) - data.gold_reward(prompt, b)
        kept = []
        while len(kept) < n:
            u = rng.random()
            z = gap + tau * math.log(u / (1 - u)) if 0 < u else -math.inf
            if z > 0:
                kept.append(sum(z >= g for g in rm_levers.GRADES))
        pairs = rm_levers.graded([{"prompt": prompt, "chosen": a, "rejected": b}] * n, tau, (0, 1, 2, 3), seed=1)
        ours = [p["margin"] for p in pairs]
        for grade in range(4):
            p = kept.count(grade) / n
            assert abs(ours.count(grade) / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 2e-3, (gap, grade)


def test_relabelled_at_a_tiny_tau_follows_the_gold_order():
    # tau -> 0: the labeller always prefers the response the gold human scores higher, whatever the stored order
    prompt = data.alpaca_prompt(*data.tasks("train", 1, seed=0)[0])
    good, bad = "Tom the cat went to the park. The end.", "Tom the cat went to the park."
    pairs = [{"prompt": prompt, "chosen": bad, "rejected": good}, {"prompt": prompt, "chosen": good, "rejected": bad}]
    assert all(p["chosen"] == good for p in rm_levers.relabelled(pairs, 1e-3, seed=0))


def test_parse_variant():
    assert rm_levers.parse_variant("margin=small, steps=2560") == {"margin": "small", "steps": 2560}
    assert rm_levers.parse_variant("lr=2e-3") == {"lr": 2e-3}
    for bad in ("margin=huge", "steps=many", "nonsense=1", "steps", ""):
        assert rm_levers.parse_variant(bad) is None, bad


def test_levers_on_a_tiny_chain(tiny_presets, tmp_path, capsys):  # noqa: F811
    seeds.train(seeds.Config(out_dir=str(tmp_path / "seeds"), preset="small", device="cpu", seeds="5",
                             rejection=False, oracle=False))
    cfg = rm_levers.Config(out_dir=str(tmp_path), device="cpu", seeds="5", variants="steps=4;margin=small")
    results = rm_levers.train(cfg)
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["recipe", "steps=4", "margin=small"]
    with open(tmp_path / "seeds" / "small" / "seed5" / "reward" / "metrics.json") as f:
        chain = json.load(f)
    gap = 100 * (chain["label_ceiling_expected"] - chain["heldout_accuracy_expected"])
    assert math.isclose(rows["recipe"]["gap"], gap)
    assert rows["recipe"]["seconds"] is None and rows["steps=4"]["seconds"] is not None
    assert json.load(open(tmp_path / "rm_levers" / "results.json")) == results
    assert "| margin=small | " in rm_levers.levers_table(results)
    capsys.readouterr()
    assert rm_levers.train(cfg) == results  # every row is there: nothing trained again
    assert "== seed" not in capsys.readouterr().out
    assert reward.PRESETS["small"] == TINY[reward]  # the fixture's tiny preset is what the levers ran with
