"""notebooks/experiments/checks.py: the InstructGPT claim's checks against hand-worked seeds' rows: each judged on the worst seed
(not the mean), on a seed's expectations where it has them, and a recipe change paired seed by seed."""

from test_results import fake_row

import checks  # noqa: E402


def test_checks_are_judged_on_the_worst_seed():
    table = checks.checks_table([fake_row(1, 0.9), fake_row(2, 0.75), fake_row(3, 0.85)])
    win = next(line for line in table.splitlines() if line.startswith("| PPO: win rate"))
    assert "| 0.75 |" in win and win.endswith("| no |")  # the mean (0.83) passes, the worst seed does not
    gap = next(line for line in table.splitlines() if "ceiling" in line)
    assert "| 3 |" in gap and gap.endswith("| yes |")  # 88 - 85 points
    spread = table.splitlines()[-1]
    assert "| 0.15 |" in spread and spread.endswith("| no |")


def test_checks_line_names_what_holds_on_the_worst_seed():
    line = checks.checks_line([fake_row(1, 0.9), fake_row(2, 0.75)])
    holds, fails = line.split(" The ones that do not: ")
    assert "PPO: win rate vs SFT >= 0.78" in fails and "PPO: win rate vs SFT" not in holds  # 0.75 on seed 2
    assert "PPO: win-rate spread over the seeds (max - min) <= 0.08" in fails  # 0.9 - 0.75
    assert "reward model: points under the labels' ceiling <= 8" in holds  # 3 points on both seeds
    assert checks.checks_line([fake_row(1, 0.9)]).endswith("The ones that do not: none.")  # one seed: no spread


def test_checks_use_a_seeds_expectations_where_it_has_them():
    one_draw, with_expected = fake_row(1, 0.79), fake_row(2, 0.79)
    with_expected["expected"] = {"samples": 4, "sft": {"follow_rate": 0.58},
                                 "ppo": {"follow_rate": 0.80, "win_rate_vs_sft": 0.81, "kl": 3.2},
                                 "dpo": {"follow_rate": 0.70, "win_rate_vs_sft": 0.77}}
    assert checks.expected(one_draw, "sft", "follow_rate") == 0.7  # PPO's one draw of the SFT model
    assert checks.expected(with_expected, "sft", "follow_rate") == 0.58
    assert round(checks.gain(with_expected, "ppo"), 6) == 22.0 and round(checks.gain(one_draw, "ppo"), 6) == 20.0
    lines = checks.checks_table([one_draw, with_expected]).splitlines()
    row = lambda start: next(line for line in lines if line.startswith(start))  # noqa: E731
    assert "| 0.58 |" in row("| SFT follow rate") and row("| SFT follow rate").endswith("| no |")
    assert "| 0.77 |" in row("| DPO: win rate") and "| 12 |" in row("| DPO: follow rate")  # 70 - 58 points
    assert "| 0.02 |" in lines[-1]  # PPO's spread: 0.81 expected against 0.79 drawn
    assert "| 3.2 |" in row("| PPO: KL") and row("| PPO: KL").endswith("| no |")  # 3.2 expected, 2.0 drawn
    assert "| 2 |" in row("| DPO: KL")  # no expected KL on either seed: each one's draw


def test_change_table_pairs_each_seed_with_itself_before():
    before = [fake_row(1, 0.70), fake_row(2, 0.80), fake_row(9, 0.10)]  # seed 9 has no row now: left out
    now = [fake_row(2, 0.85), fake_row(1, 0.82, sft_follow=0.55)]
    lines = checks.change_table(before, now).splitlines()
    assert lines[0] == "| check | bound | seed 2 | seed 1 | worst seed |"  # today's order, shared seeds only
    win = next(line for line in lines if line.startswith("| PPO: win rate"))
    assert win == "| PPO: win rate vs SFT | >= 0.78 | 0.8 -> 0.85 | 0.7 -> 0.82 | 0.7 -> 0.82 |"
    sft_row = next(line for line in lines if line.startswith("| SFT follow"))
    assert sft_row.endswith("| 0.7 -> 0.55 |")  # the worst seed now is seed 1 (0.55), not the mean
    kl = next(line for line in lines if line.startswith("| PPO: KL"))
    assert kl.endswith("| 2 -> 2 |")  # a <= bound's worst is the largest
    assert lines[-1].endswith("| 0.1 -> 0.03 |")  # spread over seeds 1 and 2 alone: 0.80 - 0.70, 0.85 - 0.82


def test_seed_changes_pairs_each_seed_with_itself_before():
    before = [fake_row(1, 0.70), fake_row(2, 0.80), fake_row(9, 0.10)]  # seed 9 has no row now: left out
    now = [fake_row(2, 0.85), fake_row(1, 0.82)]
    win = [("PPO win rate", lambda r: r["ppo"]["win_rate_vs_sft"], "6.3f")]
    assert checks.seed_changes(before, now, win).splitlines() == [
        " seed |   PPO win rate  ", "    2 |  0.800 ->  0.850", "    1 |  0.700 ->  0.820"]
