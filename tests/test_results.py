"""notebooks/results.py: the README's table and notebooks/RESULTS.md are what the script renders from the shipped
record of the runs (so a typed or stale number fails here), and the rendering itself against hand-worked cases:
a cell's mean and range, the worst seed of a check, SFT scored as PPO scores it."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import results  # noqa: E402


@pytest.fixture(scope="module")
def record():
    with open(results.RECORD) as f:
        return json.load(f)


def test_readme_table_is_rendered_from_the_shipped_record(record):
    with open(results.README) as f:
        readme = f.read()
    table = results.readme_table(record, results.optional_record(results.PROCESSES),
                                 results.optional_record(results.CHAIN_TIME))
    assert results.with_table(readme, table) == readme, \
        "README.md's results table differs from the shipped runs: run python notebooks/results.py"


def test_results_page_is_rendered_from_the_shipped_record(record):
    with open(results.PAGE) as f:
        assert f.read() == results.results_page(record, results.optional_record(results.LEVERS),
                                                     results.optional_record(results.LEVERS_BEFORE),
                                                     results.optional_record(results.RECIPE_BEFORE)), \
            "run python notebooks/results.py"


def test_the_record_has_three_seeds_of_every_method(record):
    rows = record["small"]["seeds"]
    assert len(rows) >= 3 and len({r["seed"] for r in rows}) == len(rows)
    for key, _ in results.METHODS:
        assert all(results.method_numbers(r, key) is not None for r in rows), key


def test_cell_is_the_mean_and_range():
    assert results.cell([0.5, 0.7, 0.6], ".2f") == "0.60 (0.50 to 0.70)"
    assert results.cell([1.25], "+.1f") == "+1.2" or results.cell([1.25], "+.1f") == "+1.3"
    assert results.cell([], ".2f") == "-"
    assert results.number(-0.001, ".2f") == "0.00"  # no "-0.00"


def fake_row(seed, ppo_win, sft_follow=0.7, ppo_follow=0.9):
    method = dict(gold_reward=1.0, gold_reward_sft=0.5, follow_rate=ppo_follow, follow_rate_sft=sft_follow, kl=2.0,
                  win_rate_vs_sft=ppo_win)
    return {"seed": seed, "ppo": method, "dpo": dict(method, win_rate_vs_sft=0.8),
            "reward": {"label_ceiling_expected": 0.88, "heldout_accuracy_expected": 0.85,
                       "prompt_swap": {"drop": 0.14, "gold_drop": 0.2}},
            "best_of_n": [{"n": 1, "gold_reward": 0.5, "follow_rate": 0.7, "kl": 0.0, "win_rate_vs_sft": 0.5}]}


def test_checks_are_judged_on_the_worst_seed():
    table = results.checks_table([fake_row(1, 0.9), fake_row(2, 0.75), fake_row(3, 0.85)])
    win = next(line for line in table.splitlines() if line.startswith("| PPO: win rate"))
    assert "| 0.75 |" in win and win.endswith("| no |")  # the mean (0.83) passes, the worst seed does not
    gap = next(line for line in table.splitlines() if "ceiling" in line)
    assert "| 3 |" in gap and gap.endswith("| yes |")  # 88 - 85 points
    spread = table.splitlines()[-1]
    assert "| 0.15 |" in spread and spread.endswith("| no |")


def test_checks_line_names_what_holds_on_the_worst_seed():
    line = results.checks_line([fake_row(1, 0.9), fake_row(2, 0.75)])
    holds, fails = line.split(" The ones that do not: ")
    assert "PPO: win rate vs SFT >= 0.78" in fails and "PPO: win rate vs SFT" not in holds  # 0.75 on seed 2
    assert "PPO: win-rate spread over the seeds (max - min) <= 0.08" in fails  # 0.9 - 0.75
    assert "reward model: points under the labels' ceiling <= 8" in holds  # 3 points on both seeds
    assert results.checks_line([fake_row(1, 0.9)]).endswith("The ones that do not: none.")  # one seed: no spread


def test_checks_use_a_seeds_expectations_where_it_has_them():
    one_draw, with_expected = fake_row(1, 0.79), fake_row(2, 0.79)
    with_expected["expected"] = {"samples": 4, "sft": {"follow_rate": 0.58},
                                 "ppo": {"follow_rate": 0.80, "win_rate_vs_sft": 0.81},
                                 "dpo": {"follow_rate": 0.70, "win_rate_vs_sft": 0.77}}
    assert results.expected(one_draw, "sft", "follow_rate") == 0.7  # PPO's one draw of the SFT model
    assert results.expected(with_expected, "sft", "follow_rate") == 0.58
    assert round(results.gain(with_expected, "ppo"), 6) == 22.0 and round(results.gain(one_draw, "ppo"), 6) == 20.0
    lines = results.checks_table([one_draw, with_expected]).splitlines()
    row = lambda start: next(line for line in lines if line.startswith(start))  # noqa: E731
    assert "| 0.58 |" in row("| SFT follow rate") and row("| SFT follow rate").endswith("| no |")
    assert "| 0.77 |" in row("| DPO: win rate") and "| 12 |" in row("| DPO: follow rate")  # 70 - 58 points
    assert "| 0.02 |" in lines[-1]  # PPO's spread: 0.81 expected against 0.79 drawn


def test_sft_is_scored_as_ppo_scores_it():
    row = fake_row(1, 0.9)
    assert results.method_numbers(row, "sft") == dict(gold_reward=0.5, follow_rate=0.7, kl=0.0, win_rate_vs_sft=0.5)
    assert results.method_numbers(row, "best_of_n") is None  # no N = 16 on this row: a "-" cell, not a made-up one


def test_change_table_pairs_each_seed_with_itself_before():
    before = [fake_row(1, 0.70), fake_row(2, 0.80), fake_row(9, 0.10)]  # seed 9 has no row now: left out
    now = [fake_row(2, 0.85), fake_row(1, 0.82, sft_follow=0.55)]
    lines = results.change_table(before, now).splitlines()
    assert lines[0] == "| check | bound | seed 2 | seed 1 | worst seed |"  # today's order, shared seeds only
    win = next(line for line in lines if line.startswith("| PPO: win rate"))
    assert win == "| PPO: win rate vs SFT | >= 0.78 | 0.8 -> 0.85 | 0.7 -> 0.82 | 0.7 -> 0.82 |"
    sft_row = next(line for line in lines if line.startswith("| SFT follow"))
    assert sft_row.endswith("| 0.7 -> 0.55 |")  # the worst seed now is seed 1 (0.55), not the mean
    kl = next(line for line in lines if line.startswith("| PPO: KL"))
    assert kl.endswith("| 2 -> 2 |")  # a <= bound's worst is the largest
    assert lines[-1].endswith("| 0.1 -> 0.03 |")  # spread over seeds 1 and 2 alone: 0.80 - 0.70, 0.85 - 0.82


def test_missing_markers_are_one_clear_error():
    with pytest.raises(ValueError, match="markers"):
        results.with_table("# a README without them\n", "| table |")


def test_levers_table_hand_worked():
    # a column per seed; the worst seed of a lever is its largest gap and its smallest drop share; the recipe's row
    # has no seconds of its own
    rows = [dict(seed=1, variant="recipe", gap=10.0, drop_share=0.5, train_accuracy=0.7, heldout_accuracy_expected=0.7,
                 seconds=None),
            dict(seed=1, variant="steps=2", gap=6.0, drop_share=0.8, train_accuracy=0.8, heldout_accuracy_expected=0.8,
                 seconds=10),
            dict(seed=2, variant="steps=2", gap=9.0, drop_share=0.6, train_accuracy=0.9, heldout_accuracy_expected=0.7,
                 seconds=20)]
    table = results.levers_table({"preset": "small", "rows": rows}).splitlines()
    assert table[0].startswith("| reward model | seed 1: gap, drop share | seed 2: gap, drop share | worst gap |")
    assert table[2] == "| recipe | 10.0, 0.50 |  | 10.0 | 0.50 | - |"  # not tried on seed 2: an empty cell
    assert table[3] == "| steps=2 | 6.0, 0.80 | 9.0, 0.60 | 9.0 | 0.60 | 15 |"
    assert table[-1].endswith("on every seed tried: steps=2 (1 seed).")  # seed 2 has no recipe row to beat
    rows[1]["gap"] = 11.0  # now worse than the recipe's 10 on seed 1
    assert results.levers_table({"preset": "small", "rows": rows}).endswith("on every seed tried: none.")


def test_lever_name_shortens_a_seeds_pairs_file():
    assert results.lever_name("data=out/seeds/small/seed1337/reward/pairs.jsonl") == "data=seed 1337's pairs"
    shorter = "data=seed 3's pairs,steps=2"
    assert results.lever_name("data=out_b/seeds/small/seed3/reward/pairs.jsonl,steps=2") == shorter
    assert results.lever_name("data=my_pairs.jsonl") == "data=my_pairs.jsonl"  # not a seed's: as given
    assert results.lever_name("margin=small") == "margin=small"


def test_merge_adds_seeds_and_names_each_rows_machine():
    row = lambda seed, x: {"seed": seed, "x": x}  # noqa: E731
    shipped = {"small": {"preset": "small", "machine": "A", "seeds": [row(1337, 1), row(3, 2)]},
               "medium": {"preset": "medium", "machine": "A", "seeds": [row(1337, 3)]}}
    new = {"medium": {"preset": "medium", "machine": "B", "seeds": [row(3, 4), row(1337, 5)]}}
    merged = results.merge(shipped, new)
    assert merged["small"]["seeds"] == [{**row(1337, 1), "machine": "A"}, {**row(3, 2), "machine": "A"}]
    # seed 1337 run again replaces its row (in its place); seed 3 is added; each row keeps its own machine
    assert merged["medium"]["seeds"] == [{**row(1337, 5), "machine": "B"}, {**row(3, 4), "machine": "B"}]
    assert results.merge(merged, {}) == merged  # a row that names its machine keeps it
    two = [{"seed": 1337, "machine": "A"}, {"seed": 3, "machine": "B"}, {"seed": 4, "machine": "B"}]
    assert results.machines(two) == "A (seed 1337); B (seeds 3, 4)"
    assert results.machines(two[1:]) == "B"
