"""notebooks/experiments/frontier.py: the frontier plot has one line per method through its points sorted by KL, each point
labelled with its setting; the over-optimisation plot draws gold and proxy on axes of their own, raw and smoothed;
the table and the per-method series come from hand-made rows; and a tiny sweep runs end to end (SFT, best-of-N,
rejection, PPO and DPO runs, the over-optimisation run, every output file)."""
import json
import os
from dataclasses import asdict

import matplotlib
import torch

matplotlib.use("Agg")  # no window
import matplotlib.pyplot as plt  # noqa: E402

import data  # noqa: E402
import dpo
import ppo
import reward
import stages
from model import GPT, GPTConfig, ScalarHeadModel

import frontier  # noqa: E402
import lecture  # noqa: E402

torch.set_num_threads(1)

ROWS = [dict(method="SFT", setting="-", kl=0.0, gold_reward=-0.3, win_rate_vs_sft=0.5),
        dict(method="best-of-N", setting="N=4", kl=0.636, gold_reward=0.2, win_rate_vs_sft=None),
        dict(method="best-of-N", setting="N=1", kl=0.0, gold_reward=-0.31, win_rate_vs_sft=None),
        dict(method="PPO", setting="beta=0.1", kl=2.5, gold_reward=0.41, win_rate_vs_sft=0.712),
        dict(method="PPO", setting="beta=0.01", kl=9.0, gold_reward=0.35, win_rate_vs_sft=0.69)]


def lines_and_labels(ax):
    """{method: (kls, golds)} of the plotted lines, and the settings annotated at each (kl, gold) point."""
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    labels = {tuple(t.xy): t.get_text() for t in ax.texts}
    return lines, labels


def test_plot_frontier_draws_one_line_per_method_through_its_points_by_kl():
    fig, ax = plt.subplots()
    frontier.plot_frontier(ROWS, ax)
    lines, labels = lines_and_labels(ax)
    assert lines == {"SFT": ([0.0], [-0.3]), "best-of-N": ([0.0, 0.636], [-0.31, 0.2]),
                     "PPO": ([2.5, 9.0], [0.41, 0.35])}  # sorted by KL, not in the rows' order
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SFT", "best-of-N", "PPO"]
    # each point but SFT's ("-") is labelled with its setting, in its line's colour
    assert labels == {(0.0, -0.31): "N=1", (0.636, 0.2): "N=4", (2.5, 0.41): "beta=0.1", (9.0, 0.35): "beta=0.01"}
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert all(t.get_color() == colours["PPO"] for t in ax.texts if t.get_text().startswith("beta"))
    plt.close(fig)


def test_plot_frontier_joins_points_in_kl_order_when_the_sweep_is_in_beta_order():
    # DPO's betas in the sweep's order; its KL falls and then rises again, so beta order is not KL order
    dpo_rows = [dict(method="DPO", setting=f"beta={b}", kl=kl, gold_reward=g, win_rate_vs_sft=0.6)
                for b, kl, g in [(0.03, 4.6, 1.9), (0.1, 6.1, 2.1), (0.3, 1.2, 1.5), (1.0, 2.2, 1.7)]]
    fig, ax = plt.subplots()
    frontier.plot_frontier(dpo_rows, ax)
    lines, labels = lines_and_labels(ax)
    assert lines == {"DPO": ([1.2, 2.2, 4.6, 6.1], [1.5, 1.7, 1.9, 2.1])}
    assert [labels[p] for p in zip(*lines["DPO"])] == ["beta=0.3", "beta=1.0", "beta=0.03", "beta=0.1"]
    plt.close(fig)


def test_plot_overoptimization_draws_gold_and_proxy_on_axes_of_their_own():
    history = [dict(step=i, kl=float(i), score=float(i), gold=float(10 - i)) for i in range(8)]
    fig, ax = plt.subplots()
    proxy_ax = frontier.plot_overoptimization({"setting": "beta=0", "history": history}, ax)
    (gold_raw, gold), (proxy_raw, proxy) = ax.get_lines(), proxy_ax.get_lines()  # gold reward and RM score: two units
    assert list(proxy.get_xdata()) == lecture.running_mean([float(i) for i in range(8)])
    assert list(gold.get_ydata())[:2] == [9.0, 8.5]  # centred windows of 5: the first has 3 values, the second 4
    assert list(gold_raw.get_ydata()) == [float(10 - i) for i in range(8)] and gold_raw.get_alpha() == 0.25
    assert list(proxy_raw.get_ydata()) == [float(i) for i in range(8)] and proxy_raw.get_alpha() == 0.25
    assert "gold" in ax.get_ylabel() and "RM score" in proxy_ax.get_ylabel() and "nats" in ax.get_xlabel()
    assert "beta=0" in ax.get_title()
    plt.close(fig)
    # rollouts whose KL goes back and forth: the curves are smoothed along the KL axis, so they never loop back
    wobbly = [dict(step=i, kl=float(k), score=float(i), gold=float(-i)) for i, k in enumerate([0, 3, 1, 4, 2, 6, 5])]
    fig, ax = plt.subplots()
    frontier.plot_overoptimization({"setting": "beta=0", "history": wobbly}, ax)
    xs = list(ax.get_lines()[1].get_xdata())
    assert xs == sorted(xs) and list(ax.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4, 5, 6]
    plt.close(fig)


def test_markdown_table_and_series_from_hand_made_rows():
    table = frontier.markdown_table(ROWS).splitlines()
    assert table[0] == "| method | setting | KL | gold reward | win rate vs SFT |"
    assert len(table) == 2 + len(ROWS)
    assert table[2] == "| SFT | - | 0.000 | -0.300 | 0.500 |"
    assert table[3] == "| best-of-N | N=4 | 0.636 | +0.200 | - |"
    assert table[5] == "| PPO | beta=0.1 | 2.500 | +0.410 | 0.712 |"
    series = frontier.frontier_series(ROWS)
    assert [s[0] for s in series] == ["SFT", "best-of-N", "PPO"]  # order of first appearance
    assert series[1][1:] == ([0.0, 0.636], [-0.31, 0.2], ["N=1", "N=4"])  # points sorted by KL, with their settings
    assert series[2][1:] == ([2.5, 9.0], [0.41, 0.35], ["beta=0.1", "beta=0.01"])


def test_floats_and_running_mean():
    assert frontier.floats("0.01, 0.1,1") == [0.01, 0.1, 1.0]
    assert frontier.floats("") == []
    assert lecture.running_mean([1, 3, 5, 7], k=2) == [1, 2, 4, 6]  # the first window is shorter


def test_tiny_sweep_end_to_end(tmp_path):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=72, n_layer=1, n_head=2, n_embd=32))
    cfg = frontier.Config(out_dir=str(tmp_path), preset="small", device="cpu", ppo_betas="0.1,1", dpo_betas="0.5",
                          oracle_betas="1", advantages="grpo", overopt_steps=3)
    # the three stages the sweep starts from, each with its record, in the chain's order
    stages.save_stage(str(tmp_path / "sft"), policy, {}, step=0, built_from=stages.record("sft", cfg))
    pairs = [{"prompt": data.alpaca_prompt(f"Write a story about {n}."), "chosen": f"{n} was happy. The end.",
              "rejected": f"{n} was sad and"} for n in ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"]]
    reward.save_pairs(stages.stage_config("pairs", cfg), pairs)
    stages.save_stage(str(tmp_path / "reward"), ScalarHeadModel.from_gpt(policy), {}, step=0,
                   built_from=stages.record("reward", cfg))
    bon = [{"n": 1, "gold_reward": -1.0, "rm_score": 0.0, "kl": 0.0},
           {"n": 2, "gold_reward": -0.8, "rm_score": 0.3, "kl": 0.193}]
    bon_cfg = stages.stage_config("best_of_n", cfg)  # best-of-N's curve, as reward.best_of_n_stage writes it: reused
    (tmp_path / "best_of_n").mkdir()
    (tmp_path / "best_of_n" / "metrics.json").write_text(json.dumps(
        {"best_of_n": bon, "config": asdict(bon_cfg), "built_from": stages.record("best_of_n", bon_cfg)}))
    stages.save_stage(str(tmp_path / "rejection"), policy, {}, step=0,  # the model rejection -> PPO starts from
                   built_from=stages.record("rejection", cfg))
    (tmp_path / "rejection" / "metrics.json").write_text(json.dumps(
        {"gold_reward": -0.7, "kl": 0.4, "win_rate_vs_sft": 0.6, "config": {"rs_n": 8}}))
    ppo_cfg = ppo.Config(device="cpu", steps=2, batch_size=4, n_epochs=1, n_minibatches=2, max_new_tokens=8,
                         n_prompts=16, eval_prompts=4, sample_every=0)
    dpo_cfg = dpo.Config(device="cpu", steps=2, batch_size=2, val_frac=0.34, eval_every=2, eval_prompts=4,
                         max_new_tokens=8)
    results = frontier.train(cfg, ppo_cfg, dpo_cfg)

    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert list(rows) == [("SFT", "-"), ("best-of-N", "N=1"), ("best-of-N", "N=2"),
                          ("rejection sampling", "best-of-8"), ("PPO", "beta=0.1"), ("PPO", "beta=1"),
                          ("DPO", "beta=0.5"), ("PPO on the gold human", "beta=1"), ("GRPO", "beta=0.3, G=4"),
                          ("rejection -> PPO", "beta=0.3")]
    assert rows["SFT", "-"]["kl"] == 0.0 and rows["best-of-N", "N=2"]["kl"] == 0.193
    runs = {"ppo_beta0.1/ppo": rows["PPO", "beta=0.1"], "ppo_beta1/ppo": rows["PPO", "beta=1"],
            "dpo_beta0.5/dpo": rows["DPO", "beta=0.5"], "ppo_overopt/ppo": results["overoptimization"],
            "ppo_gold_beta1/ppo": rows["PPO on the gold human", "beta=1"],
            "ppo_grpo/ppo": rows["GRPO", "beta=0.3, G=4"],
            "ppo_from_rejection/ppo": rows["rejection -> PPO", "beta=0.3"]}
    for run, r in runs.items():  # each run wrote its own folder, and its numbers are the row's
        saved = json.loads((tmp_path / "frontier" / run / "metrics.json").read_text())
        assert (saved["gold_reward"], saved["kl"]) == (r["gold_reward"], r["kl"])
        assert saved["gold_reward_sft"] == rows["SFT", "-"]["gold_reward"]  # the same SFT samples for everyone
    assert not os.path.exists(tmp_path / "ppo") and not os.path.exists(tmp_path / "dpo")  # nothing else written
    assert [h["step"] for h in results["overoptimization"]["history"]] == [0, 1, 2]
    for name in ["frontier.png", "overoptimization.png"]:  # matplotlib's PNGs, each a real picture
        image = plt.imread(tmp_path / "frontier" / name)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0
    table = (tmp_path / "frontier" / "table.md").read_text()
    assert table == frontier.markdown_table(results["rows"]) and "| DPO | beta=0.5 |" in table
    assert json.loads((tmp_path / "frontier" / "results.json").read_text())["rows"] == results["rows"]

    # a second sweep with the same configs reuses every run instead of training it again
    again = frontier.train(cfg, ppo_cfg, dpo_cfg)
    assert [r["seconds"] for r in again["rows"][-6:]] == [0] * 6
    assert [r["gold_reward"] for r in again["rows"][-6:]] == [r["gold_reward"] for r in results["rows"][-6:]]
