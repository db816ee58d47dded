"""notebooks/experiments/results.py: the README's table and notebooks/experiments/RESULTS.md are what the script renders from the shipped
record of the runs (so a typed or stale number fails here), and the rendering itself against hand-worked cases:
a cell's mean and range, SFT scored as PPO scores it, the merge of seeds' rows (the checks: test_checks.py)."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402


@pytest.fixture(scope="module")
def record():
    with open(results.RECORD) as f:
        return json.load(f)


def test_readme_table_and_time_are_rendered_from_the_shipped_records(record):
    with open(results.README) as f:
        readme = f.read()
    assert results.rendered_readme(readme, record) == readme, \
        "README.md's table or time differs from the shipped runs: run python notebooks/experiments/results.py"


@pytest.mark.parametrize("name", list(results.LECTURES))
def test_each_lectures_run_time_is_rendered_from_the_records(record, name):
    path = os.path.join(ROOT, "notebooks", f"{name}.ipynb")
    with open(path) as f:
        stored = f.read()
    assert results.rendered_lecture(path, record, results.optional_record(results.FRONTIER)) == stored, \
        f"{name}'s run-time line differs from the records: run python notebooks/experiments/results.py"


def test_readme_table_reads_at_a_glance(record):
    """At most five columns and rows of at most 120 characters (the second preset and the provenance are
    RESULTS.md's), one row a method that ran."""
    lines = results.readme_table(record).splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert all(line.count("|") - 1 <= 5 for line in table)
    assert max(map(len, table)) <= 120
    ran = [m for m, _ in results.METHODS if m == "sft" or any(m in r for r in record["small"]["seeds"])]
    assert len(table) == 2 + len(ran)


def test_readme_time_names_the_slowest_machine_first():
    line = results.readme_time([{"seconds": 600.0, "machine": "Intel X, 2 cores, all threads"},
                                {"seconds": 900.0, "machine": "AMD Y, 2 cores, all threads"}])
    assert line.index("15.0 minutes on AMD Y") < line.index("10.0 minutes on Intel X")


def test_readme_time_says_whether_the_slowest_machine_has_a_class_time():
    said = lambda runs: " ".join(results.readme_time(runs).split())  # noqa: E731
    fits = said([{"seconds": 540.0, "machine": "AMD Y, 2 cores, all threads"}])
    over = said([{"seconds": 660.0, "machine": "AMD Y, 2 cores, all threads"},
                 {"seconds": 300.0, "machine": "Intel X, 2 cores, all threads"}])
    assert "within the 10 minutes" in fits and "over the 10 minutes" in over  # the slowest machine decides


def test_an_earlier_recipe_is_compared_with_the_recipe_it_was_measured_against(record):
    rows = record["small"]["seeds"]
    worse = [{**r, "ppo": {**r["ppo"], "win_rate_vs_sft": 0.5}} for r in rows]
    before = [{"recipe": "A", "small": {"seeds": worse}, "after": "B"},
              {"recipe": "B, in full", "name": "B", "small": {"seeds": rows}}]
    page = results.change_section(before, {"small": {"seeds": worse}})
    a_part, b_part = page.split("### A -> B")[1].split("### B, in full -> today's")
    assert results.change_table(worse, rows) in a_part  # A against B, not against today's
    assert results.change_table(rows, worse) in b_part  # B against today's


def test_results_page_is_rendered_from_the_shipped_record(record):
    with open(results.PAGE) as f:
        assert f.read() == results.results_page(record, results.optional_record(results.LEVERS),
                                                results.optional_record(results.LEVERS_BEFORE),
                                                results.optional_record(results.RECIPE_BEFORE),
                                                results.optional_record(results.PROCESSES),
                                                results.optional_record(results.CHAIN_TIME)), \
            "run python notebooks/experiments/results.py"


def test_the_record_has_three_seeds_of_every_method_it_shows(record):
    # the checks' methods on every seed; an optional one (seeds.py --rejection, --oracle) on every seed or on none,
    # so that no row of the table is a mean over other seeds than the rest
    rows = record["small"]["seeds"]
    assert len(rows) >= 3 and len({r["seed"] for r in rows}) == len(rows)
    for key, _ in results.METHODS:
        ran = [results.method_numbers(r, key) is not None for r in rows]
        assert all(ran) or (key in ("rejection", "oracle") and not any(ran)), key


def test_cell_is_the_mean_and_range():
    assert results.cell([0.5, 0.7, 0.6], ".2f") == "0.60 (0.50 to 0.70)"
    assert results.compact_cell([0.5, 0.7, 0.6], ".2f") == "0.60 [0.50, 0.70]"
    assert results.compact_cell([1.84, 1.84], ".2f") == "1.84"  # every seed the same: the number alone
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


def test_sft_is_scored_as_ppo_scores_it():
    row = fake_row(1, 0.9)
    assert results.method_numbers(row, "sft") == dict(gold_reward=0.5, follow_rate=0.7, kl=0.0, win_rate_vs_sft=0.5)
    assert results.method_numbers(row, "best_of_n") is None  # no N = 16 on this row: a "-" cell, not a made-up one


def test_ppo_settings_name_the_controllers_floor():
    # a row recorded before ppo.Config.kl_coef_floor says no floor; a floor of 1 is "never below" the start
    dpo = {"beta": 0.3, "steps": 240, "twins": False}
    ppo = {"kl_coef": 0.3, "adaptive_kl": True, "target_kl": 2.5}
    words = [results.method_settings([{"settings": {"ppo": dict(ppo, **floor), "dpo": dpo}}]).split(";")[0]
             for floor in ({}, {"kl_coef_floor": 1.0}, {"kl_coef_floor": 0.5})]
    assert words == ["PPO beta adapted towards a KL of 2.5 nats from 0.3",
                     "PPO beta adapted towards a KL of 2.5 nats from 0.3 and never below it",
                     "PPO beta adapted towards a KL of 2.5 nats from 0.3, never below 0.5 times that"]


def test_recipe_change_says_when_the_samples_differ():
    # an earlier recipe's expectations over 4 samples a prompt, today's over 16: the section says so, and only then
    def with_samples(n):
        row = fake_row(1, 0.8)
        row["settings"] = {"ppo": {"kl_coef": 0.3, "adaptive_kl": False},
                           "dpo": {"beta": 0.3, "steps": 240, "twins": False}}
        method = {"follow_rate": 0.8, "win_rate_vs_sft": 0.8}
        row["expected"] = {"samples": n, "sft": {"follow_rate": 0.6}, "ppo": method, "dpo": method}
        return dict(row, machine="m")
    today = {"small": {"seeds": [with_samples(16)]}}
    differ = results.change_section([{"recipe": "Before", "small": {"seeds": [with_samples(4)]}}], today)
    same = results.change_section([{"recipe": "Before", "small": {"seeds": [with_samples(16)]}}], today)
    assert "expectations over 4 samples a prompt there and 16 today" in differ
    assert "samples a prompt there" not in same


def test_missing_markers_are_one_clear_error():
    with pytest.raises(ValueError, match="markers"):
        results.with_block("# a README without them\n", "| table |")


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


def test_reward_baselines_from_the_default_chain_or_the_seeds(tmp_path):
    def metrics(longer, names, rm):
        return {"heldout_accuracy": rm, "heldout_accuracy_expected": rm - 0.01, "label_ceiling": 0.9,
                "label_ceiling_expected": 0.88, "baselines": {"the longer answer": {"accuracy": longer, "expected": longer},
                                                             "names the request": {"accuracy": names, "expected": names}}}
    assert results.baselines_record(str(tmp_path)) is None  # no out/reward/metrics.json yet
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "metrics.json").write_text(json.dumps({**metrics(0.4, 0.6, 0.8),
                                                                   "config": {"seed": 7, "n_eval_pairs": 64}}))
    default = results.baselines_record(str(tmp_path))
    assert default["seed"] == 7 and default["pairs"] == 64 and default["baselines"]["the longer answer"]["accuracy"] == 0.4
    # seeds without the rules: the default chain's, said so
    text = "\n".join(results.baselines_section([{"seed": 1, "reward": {}}], default))
    assert "on the default chain only (seed 7" in text and "| rule: the longer answer | 0.400 | 0.400 |" in text
    assert "| the reward model | 0.800 | 0.790 |" in text and "On the same 64 held-out pairs" in text
    # seeds with the rules: their mean and range, the default chain left out
    rows = [{"seed": s, "reward": metrics(a, b, c)} for s, a, b, c in [(1, 0.4, 0.6, 0.8), (2, 0.5, 0.7, 0.9)]]
    text = "\n".join(results.baselines_section(rows, default))
    assert "over the 2 seeds that recorded them" in text
    assert "| rule: the longer answer | 0.450 (0.400 to 0.500) | 0.450 (0.400 to 0.500) |" in text
    assert results.baselines_section([{"seed": 1, "reward": {}}], None) == []
