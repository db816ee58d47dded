"""notebooks/experiments/online.py and notebooks/experiments/rm_size.py, tiny, end to end: the online arm's reward model really learns from
the policy's samples between rounds (its data grows, its weights move), both arms take the same PPO steps in all,
and each reward-model width is trained from an SFT model of its own width, measured on the policy's held-out pairs."""
import dataclasses
import json
import os

import pytest
import torch

import ppo
import reward
import sft
import stages
from model import load_model

import online  # noqa: E402
import rm_size  # noqa: E402

torch.set_num_threads(1)
TINY_SFT = dict(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=3,
                sft_steps=3, batch_size=4, eval_prompts=4, max_new_tokens=16, preset="small", device="cpu")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny pretrain -> sft -> pairs -> reward chain, and the tiny configs of the later stages."""
    out = str(tmp_path_factory.mktemp("chain"))
    scfg = sft.Config(out_dir=out, **TINY_SFT)
    sft.sft(scfg)
    rcfg = reward.Config(out_dir=out, preset="small", device="cpu", n_prompts=6, k=2, n_eval_pairs=6, steps=3,
                         batch_size=4, eval_prompts=4, bon_prompts=2, bon_max_n=2, max_new_tokens=16)
    reward.train(rcfg)
    pcfg = ppo.Config(out_dir=out, preset="small", device="cpu", steps=2, batch_size=4, n_epochs=1, n_minibatches=2,
                      max_new_tokens=8, n_prompts=16, eval_prompts=4, sample_every=0)
    return out, scfg, rcfg, pcfg


def test_online_rounds_grow_the_reward_models_data(chain, monkeypatch):
    out, _, rcfg, pcfg = chain
    seen = []  # (number of pairs, a weight of the reward model) at each reward-model update
    train_rm = reward.train_reward_model

    def spy(rm, pairs, cfg, device):
        before = rm.head.weight.detach().clone()
        history = train_rm(rm, pairs, cfg, device)
        seen.append((len(pairs), cfg.steps, not torch.equal(before, rm.head.weight)))
        return history
    monkeypatch.setattr(reward, "train_reward_model", spy)
    cfg = online.Config(out_dir=out, preset="small", device="cpu", rounds=3, steps=6, n_prompts=3, rm_steps=2)
    rows = online.train(cfg, rcfg, pcfg)
    offline, rounds = rows[0], rows[1:]
    assert offline["arm"] == "offline" and offline["steps"] == 6
    assert [r["round"] for r in rounds] == [1, 2, 3] and [r["steps"] for r in rounds] == [2, 4, 6]
    start = len(reward.load_pairs(stages.output_path("pairs", out)))
    assert [r["pairs"] for r in rounds][0] == start and rounds[1]["pairs"] > start  # round 2's RM saw more pairs
    assert [n for n, _, _ in seen] == [rounds[1]["pairs"], rounds[2]["pairs"]]  # updates between rounds only
    assert all(steps == 2 and moved for _, steps, moved in seen)
    assert json.loads(open(os.path.join(out, "online", "results.json")).read())["rows"] == rows


def test_rm_size_trains_each_width_from_its_own_sft_model(chain):
    out, scfg, rcfg, pcfg = chain
    cfg = rm_size.Config(out_dir=out, preset="small", device="cpu", widths="16,48")
    rows = rm_size.train(cfg, rcfg, pcfg, dataclasses.replace(scfg, n_head=2))
    assert [r["width"] for r in rows] == [16, 32, 48]
    assert os.path.exists(os.path.join(out, "ppo", "metrics.json"))  # the policy's own width: the chain's PPO run
    for width in (16, 48):
        start = load_model(os.path.join(out, "rm_size", f"w{width}", "sft", "model.pt"))
        assert start.config.n_embd == width and start.config.n_layer == scfg.n_layer  # trained as the policy was
        assert os.path.exists(os.path.join(out, "rm_size", f"w{width}", "policy", "ppo", "metrics.json"))
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows)
    for r in rows:
        assert 0 <= r["follow_rate"] <= 1 and r["gap"] == pytest.approx(r["gap"])  # finite
    assert "| 16 wide" in open(os.path.join(out, "rm_size", "table.md")).read()


def test_the_levers_benchmark_times_each_lever_on_the_chains_shapes():
    # a run, not a timing: the benchmark prints ratios; here its pairs have the chain's shape and every lever runs
    import benchmark
    from model import GPTConfig
    pairs = benchmark.story_pairs(6, seed=0)
    groups = reward.by_prompt(pairs)
    assert len(groups) == 6 and all(len(ys) <= 8 and len(cs) <= 10 for _, ys, cs in groups)  # 4 samples, 4 twins
    assert sum(map(reward.is_twin, pairs)) >= 6 * 3  # a twin is dropped only where retelling changes nothing
    cfg = benchmark.Config(warmup=0, repeats=1, batch_size=2)
    out = benchmark.bench_levers(GPTConfig(vocab_size=1024, block_size=192, n_layer=1, n_head=2, n_embd=16), cfg,
                                 steps=1)
    assert len(out) == 3 and all(before > 0 and after > 0 and unit for before, after, unit in out.values())
