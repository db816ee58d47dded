"""notebooks/frontier.py: the SVG writer produces well-formed XML with one line and one legend entry per series, the
ticks are round and cover the data, the table and the per-method series from hand-made rows, and a tiny sweep end
to end (SFT, best-of-N, rejection, PPO and DPO runs, the over-optimisation run, every output file)."""
import json
import os
import sys
import xml.etree.ElementTree as ET

import torch

import data
import dpo
import ppo
import reward
import sft
from model import GPT, GPTConfig, ScalarHeadModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks"))
import frontier  # noqa: E402

torch.set_num_threads(1)
SVG = "{http://www.w3.org/2000/svg}"

ROWS = [dict(method="SFT", setting="-", kl=0.0, gold_reward=-0.3, win_rate_vs_sft=0.5),
        dict(method="best-of-N", setting="N=4", kl=0.636, gold_reward=0.2, win_rate_vs_sft=None),
        dict(method="best-of-N", setting="N=1", kl=0.0, gold_reward=-0.31, win_rate_vs_sft=None),
        dict(method="PPO", setting="beta=0.1", kl=2.5, gold_reward=0.41, win_rate_vs_sft=0.712),
        dict(method="PPO", setting="beta=0.01", kl=9.0, gold_reward=0.35, win_rate_vs_sft=0.69)]


def test_svg_plot_is_xml_with_one_line_and_legend_entry_per_series():
    series = [("SFT", [0.0], [-0.3]), ("PPO <beta>", [0.5, 2.0, 8.0], [0.1, 0.4, 0.2]),
              ("best-of-N", [0.0, 0.31, 0.64], [-0.3, -0.1, 0.1])]
    root = ET.fromstring(frontier.svg_plot(series, "KL (nats)", "gold reward", "frontier & co"))
    assert root.tag == SVG + "svg"
    lines = root.findall(SVG + "polyline")
    assert len(lines) == 3
    assert [len(p.get("points").split()) for p in lines] == [1, 3, 3]
    texts = [t.text for t in root.iter(SVG + "text")]
    for label in ["SFT", "PPO <beta>", "best-of-N", "KL (nats)", "gold reward", "frontier & co"]:
        assert label in texts  # escaped in the file, the original text once parsed
    # every point lies inside the plot frame (the second rect; the first is the white background)
    frame = root.findall(SVG + "rect")[1]
    x0, y0 = float(frame.get("x")), float(frame.get("y"))
    x1, y1 = x0 + float(frame.get("width")), y0 + float(frame.get("height"))
    for p in lines:
        for xy in p.get("points").split():
            x, y = map(float, xy.split(","))
            assert x0 - 1e-6 <= x <= x1 + 1e-6 and y0 - 1e-6 <= y <= y1 + 1e-6


def test_ticks_are_round_and_cover_the_range():
    assert frontier.ticks(0, 3.17) == [0, 1, 2, 3, 4]
    assert frontier.ticks(-0.46, 0.8) == [-0.5, 0, 0.5, 1]
    assert frontier.ticks(0.0, 0.0) == [0, 1]  # a flat range still spans something
    for lo, hi in [(-7.3, 2.2), (0.001, 0.0043), (12, 480)]:
        t = frontier.ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 12


def test_markdown_table_and_series_from_hand_made_rows():
    table = frontier.markdown_table(ROWS).splitlines()
    assert table[0] == "| method | setting | KL | gold reward | win rate vs SFT |"
    assert len(table) == 2 + len(ROWS)
    assert table[2] == "| SFT | - | 0.000 | -0.300 | 0.500 |"
    assert table[3] == "| best-of-N | N=4 | 0.636 | +0.200 | - |"
    assert table[5] == "| PPO | beta=0.1 | 2.500 | +0.410 | 0.712 |"
    series = frontier.frontier_series(ROWS)
    assert [s[0] for s in series] == ["SFT", "best-of-N", "PPO"]  # order of first appearance
    assert series[1][1:] == ([0.0, 0.636], [-0.31, 0.2])  # points sorted by KL
    assert series[2][1:] == ([2.5, 9.0], [0.41, 0.35])


def test_floats_and_running_mean():
    assert frontier.floats("0.01, 0.1,1") == [0.01, 0.1, 1.0]
    assert frontier.floats("") == []
    assert frontier.running_mean([1, 3, 5, 7], k=2) == [1, 2, 4, 6]  # the first window is shorter


def test_tiny_sweep_end_to_end(tmp_path):
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=72, n_layer=1, n_head=2, n_embd=32))
    cfg = frontier.Config(out_dir=str(tmp_path), preset="small", device="cpu", ppo_betas="0.1,1", dpo_betas="0.5",
                          overopt_steps=3)
    # the three stages the sweep starts from, each with its record, in the chain's order
    sft.save_stage(str(tmp_path / "sft"), policy, {}, step=0, built_from=sft.record("sft", cfg))
    pairs = [{"prompt": data.alpaca_prompt(f"Write a story about {n}."), "chosen": f"{n} was happy. The end.",
              "rejected": f"{n} was sad and"} for n in ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"]]
    reward.save_pairs(sft.stage_config("pairs", cfg), pairs)
    sft.save_stage(str(tmp_path / "reward"), ScalarHeadModel.from_gpt(policy), {}, step=0,
                   built_from=sft.record("reward", cfg))
    bon = [{"n": 1, "gold_reward": -1.0, "rm_score": 0.0, "kl": 0.0},
           {"n": 2, "gold_reward": -0.8, "rm_score": 0.3, "kl": 0.193}]
    (tmp_path / "reward" / "metrics.json").write_text(json.dumps({"best_of_n": bon}))
    os.makedirs(tmp_path / "rejection")
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
                          ("DPO", "beta=0.5")]
    assert rows["SFT", "-"]["kl"] == 0.0 and rows["best-of-N", "N=2"]["kl"] == 0.193
    runs = {"ppo_beta0.1/ppo": rows["PPO", "beta=0.1"], "ppo_beta1/ppo": rows["PPO", "beta=1"],
            "dpo_beta0.5/dpo": rows["DPO", "beta=0.5"], "ppo_overopt/ppo": results["overoptimization"]}
    for run, r in runs.items():  # each run wrote its own folder, and its numbers are the row's
        saved = json.loads((tmp_path / "frontier" / run / "metrics.json").read_text())
        assert (saved["gold_reward"], saved["kl"]) == (r["gold_reward"], r["kl"])
        assert saved["gold_reward_sft"] == rows["SFT", "-"]["gold_reward"]  # the same SFT samples for everyone
    assert not os.path.exists(tmp_path / "ppo") and not os.path.exists(tmp_path / "dpo")  # nothing else written
    assert [h["step"] for h in results["overoptimization"]["history"]] == [0, 1, 2]
    for name in ["frontier.svg", "overoptimization.svg"]:
        root = ET.parse(tmp_path / "frontier" / name).getroot()
        assert len(root.findall(SVG + "polyline")) == (5 if name == "frontier.svg" else 2)
    table = (tmp_path / "frontier" / "table.md").read_text()
    assert table == frontier.markdown_table(results["rows"]) and "| DPO | beta=0.5 |" in table
    assert json.loads((tmp_path / "frontier" / "results.json").read_text())["rows"] == results["rows"]

    # a second sweep with the same configs reuses every run instead of training it again
    again = frontier.train(cfg, ppo_cfg, dpo_cfg)
    assert [r["seconds"] for r in again["rows"][-3:]] == [0, 0, 0]
    assert [r["gold_reward"] for r in again["rows"][-3:]] == [r["gold_reward"] for r in results["rows"][-3:]]
