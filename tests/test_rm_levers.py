"""notebooks/experiments/rm_levers.py: the graded labeller against a naive simulation of the labeller it stands for, the
variants' parsing, and the experiment end to end on a tiny seed chain (the recipe's row is the chain's own reward
model; a lever's row is trained again, and a second run reuses the first's rows)."""
import json
import math
import random

import data
import reward
from test_seeds import TINY, tiny_presets  # noqa: F401  (the fixture)

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
    assert rm_levers.parse_variant("ensemble=3") == {"ensemble": 3}
    for bad in ("margin=huge", "steps=many", "nonsense=1", "steps", "", "ensemble=1", "ensemble=two"):
        assert rm_levers.parse_variant(bad) is None, bad


def test_ensemble_is_the_mean_of_its_members():
    import torch
    from model import GPTConfig, ScalarHeadModel
    torch.manual_seed(0)
    members = [ScalarHeadModel(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=8))
               for _ in range(3)]
    ensemble = rm_levers.Ensemble(members)
    ensemble.head.bias += 0.25
    idx, mask = torch.randint(50, (2, 7)), torch.ones(2, 7, dtype=torch.bool)
    naive = sum(m(idx, mask) for m in members) / 3 + 0.25
    assert torch.allclose(ensemble(idx, mask), naive, atol=1e-6)


def test_levers_on_a_tiny_chain(tiny_presets, tmp_path, capsys):  # noqa: F811
    seeds.train(seeds.Config(out_dir=str(tmp_path / "seeds"), preset="small", device="cpu", seeds="5",
                             rejection=False, oracle=False))
    own_pairs = f"data={tmp_path / 'seeds' / 'small' / 'seed5' / 'reward' / 'pairs.jsonl'}"
    cfg = rm_levers.Config(out_dir=str(tmp_path), device="cpu", seeds="5",
                           variants=f"steps=4;margin=small;ensemble=2;{own_pairs};k=3;k=2")
    results = rm_levers.train(cfg)
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["recipe", "steps=4", "margin=small", "ensemble=2", "ensemble=2#0", "ensemble=2#1", own_pairs,
                          "k=3", "k=2"]
    chain_pairs = sum(1 for _ in open(own_pairs.split("=", 1)[1]))
    assert rows["steps=4"]["pairs"] == chain_pairs
    assert rows["k=3"]["pairs"] > chain_pairs  # 3 pairs of samples a prompt where k=2 gave 1: sampled again
    # the chain's own k, sampled again: the chain's pairs exactly (same seed, same samples, same twins and labels)
    assert rows["k=2"]["pairs"] == chain_pairs and rows["k=2"]["gap"] == rows["recipe"]["gap"]
    assert rows[own_pairs]["gap"] == rows["recipe"]["gap"]  # the seed's own pairs, read from the file named
    assert rows["ensemble=2#0"]["gap"] == rows["recipe"]["gap"]  # member 0 is the chain's own reward model again
    assert rows["ensemble=2#1"]["gap"] != rows["recipe"]["gap"]
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


def test_retold_once_flips_exactly_one_request():
    # against the gold human: the twin meets exactly one request more, or one fewer, than its story
    rng = random.Random(0)
    flipped = 0
    for i, (instruction, given) in enumerate(data.tasks("train", 200, seed=3)):
        prompt = data.alpaca_prompt(instruction, given)
        story = data.demonstration(random.Random(i), instruction, given)
        twin = rm_levers.retold_once(prompt, story, rng)
        (met, _), (twin_met, _) = data.requests_met(prompt, story), data.requests_met(prompt, twin)
        if twin != story:
            flipped += 1
            assert abs(twin_met - met) == 1, (prompt, story, twin)
    assert flipped > 150  # most stories have a word of the drawn kind to flip


def test_levers_table_hand_worked():
    # a column per seed; the worst seed of a lever is its largest gap and its smallest drop share; the recipe's row
    # has no seconds of its own
    rows = [dict(seed=1, variant="recipe", gap=10.0, drop_share=0.5, train_accuracy=0.7, heldout_accuracy_expected=0.7,
                 seconds=None),
            dict(seed=1, variant="steps=2", gap=6.0, drop_share=0.8, train_accuracy=0.8, heldout_accuracy_expected=0.8,
                 seconds=10),
            dict(seed=2, variant="steps=2", gap=9.0, drop_share=0.6, train_accuracy=0.9, heldout_accuracy_expected=0.7,
                 seconds=20)]
    table = rm_levers.levers_table({"preset": "small", "rows": rows}).splitlines()
    assert table[0].startswith("| reward model | seed 1: gap, drop share | seed 2: gap, drop share | worst gap |")
    assert table[2] == "| recipe | 10.0, 0.50 |  | 10.0 | 0.50 | - |"  # not tried on seed 2: an empty cell
    assert table[3] == "| steps=2 | 6.0, 0.80 | 9.0, 0.60 | 9.0 | 0.60 | 15 |"
    assert table[-1].endswith("on every seed tried: steps=2 (1 seed).")  # seed 2 has no recipe row to beat
    rows[1]["gap"] = 11.0  # now worse than the recipe's 10 on seed 1
    assert rm_levers.levers_table({"preset": "small", "rows": rows}).endswith("on every seed tried: none.")


def test_lever_name_shortens_a_seeds_pairs_file():
    assert rm_levers.lever_name("data=out/seeds/small/seed1337/reward/pairs.jsonl") == "data=seed 1337's pairs"
    shorter = "data=seed 3's pairs,steps=2"
    assert rm_levers.lever_name("data=out_b/seeds/small/seed3/reward/pairs.jsonl,steps=2") == shorter
    assert rm_levers.lever_name("data=my_pairs.jsonl") == "data=my_pairs.jsonl"  # not a seed's: as given
    assert rm_levers.lever_name("margin=small") == "margin=small"
