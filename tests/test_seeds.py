"""notebooks/experiments/seeds.py, tiny, end to end: every seed gets a chain of its own (its own pretraining, reward model and
methods), each stage is built with that seed, a second run reuses what the first built, and results.json holds one
row per seed with every method's numbers."""
import json
import os

import pytest
import torch

import dpo
import ppo
import reward
import sft
from model import load_checkpoint

import results as results_module  # noqa: E402
import seeds  # noqa: E402

TINY = {sft: dict(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=3,
                  sft_steps=3, batch_size=4, eval_prompts=4, max_new_tokens=16),
        reward: dict(n_prompts=6, k=2, n_eval_pairs=6, steps=3, batch_size=4, eval_prompts=4, bon_prompts=4,
                     bon_max_n=4, max_new_tokens=16, rs_prompts=4, rs_n=2, rs_steps=2),
        ppo: dict(steps=2, batch_size=4, n_epochs=1, n_minibatches=2, max_new_tokens=8, n_prompts=16, eval_prompts=4,
                  sample_every=0),
        dpo: dict(steps=2, batch_size=4, eval_every=1, eval_prompts=4, max_new_tokens=8)}


@pytest.fixture
def tiny_presets(monkeypatch):
    for module, overrides in TINY.items():
        monkeypatch.setitem(module.PRESETS, "small", overrides)


def test_each_seed_has_a_chain_of_its_own(tiny_presets, tmp_path, capsys):
    cfg = seeds.Config(out_dir=str(tmp_path), preset="small", device="cpu", seeds="5,6")
    results = seeds.train(cfg)
    assert [r["seed"] for r in results["seeds"]] == [5, 6] and results["preset"] == "small"
    for seed in (5, 6):
        folder = tmp_path / "small" / f"seed{seed}"
        for stage in ("pretrain", "sft", "reward", "rejection", "ppo", "dpo"):  # built with this seed
            settings = load_checkpoint(str(folder / stage / "model.pt"))["built_from"]["settings"]
            assert settings.get("seed", seed) == seed, stage
        assert json.load(open(folder / "oracle" / "ppo" / "metrics.json"))["config"]["reward"] == "gold"
    a, b = (load_checkpoint(str(tmp_path / "small" / f"seed{s}" / "pretrain" / "model.pt"))["model"] for s in (5, 6))
    assert any((a[k] != b[k]).any() for k in a)  # two seeds, two pretrained models
    row = results["seeds"][0]
    for method in ("ppo", "dpo", "rejection", "oracle"):
        assert set(seeds.FIELDS) <= set(row[method]), method
    assert row["best_of_n"][0]["n"] == 1 and row["best_of_n"][0]["kl"] == 0
    ppo_config = json.load(open(tmp_path / "small" / "seed5" / "ppo" / "metrics.json"))["config"]
    ppo_keys = ("kl_coef", "adaptive_kl", "target_kl", "kl_coef_floor")
    assert row["settings"]["ppo"] == {k: ppo_config[k] for k in ppo_keys}
    dpo_config = json.load(open(tmp_path / "small" / "seed5" / "dpo" / "metrics.json"))["config"]
    assert row["settings"]["dpo"] == {k: dpo_config[k] for k in ("beta", "steps", "twins")}
    assert results_module.method_settings([row]) == (  # the recipe, in words
        f"reward model {TINY[reward]['steps']} steps, read as its mean over the response, labels smoothed by "
        f"{reward.Config.label_smoothing:g}, best-of-N on "
        f"{TINY[reward]['bon_prompts']} prompts; PPO beta adapted towards a KL of {ppo_config['target_kl']:g} nats "
        f"from {ppo_config['kl_coef']:g} and never below it; "
        f"DPO beta={dpo_config['beta']:g}, {dpo_config['steps']} steps on the sampled pairs")
    assert set(row["seconds"]) == {"pretrain", "sft", "pairs", "reward", "best_of_n", "rejection", "ppo", "dpo",
                                   "oracle", "expected"}
    assert json.load(open(tmp_path / "small" / "results.json")) == results
    capsys.readouterr()
    again = seeds.train(cfg)  # everything is there: nothing is trained again, the same numbers come back
    assert "pretraining" not in capsys.readouterr().out
    assert again["seeds"] == results["seeds"]
    assert row["settings"]["reward"] == {"steps": TINY[reward]["steps"], "readout": "mean",
                                         "label_smoothing": reward.Config.label_smoothing,
                                         "bon_prompts": TINY[reward]["bon_prompts"]}


def test_a_method_is_trained_again_when_its_reward_model_was(tiny_presets, tmp_path, capsys, monkeypatch):
    cfg = seeds.Config(out_dir=str(tmp_path), preset="small", device="cpu", seeds="5", oracle=False, rejection=False)
    seeds.train(cfg)
    folder = tmp_path / "small" / "seed5"
    os.remove(folder / "reward" / "model.pt")  # a reward model of another recipe on the same pairs
    monkeypatch.setitem(reward.PRESETS["small"], "steps", TINY[reward]["steps"] + 1)
    capsys.readouterr()
    seeds.train(cfg)  # PPO's and best-of-N's own configs are unchanged: their parent is not
    out = capsys.readouterr().out
    assert f"{folder}: training ppo" in out and f"{folder}: training best_of_n" in out
    assert f"{folder / 'dpo' / 'metrics.json'}: done before with this config, reused" in out  # DPO has no reward model


def test_expectations_of_a_copy_of_sft_are_sfts_own(tmp_path):
    # PPO the SFT model's very copy: the same draws, so its KL to SFT is 0 and its follow rate SFT's; its win rate is
    # 1/2 by symmetry (each pair of samples is counted both ways round). DPO a far sharper model: a positive KL.
    from model import GPT, GPTConfig
    import data
    import stages
    torch.manual_seed(0)
    config = GPTConfig(data.tokenizer().n_vocab, block_size=128, n_layer=1, n_head=2, n_embd=32)
    model, other = GPT(config), GPT(config)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(10)
    for name, m in (("sft", model), ("ppo", model), ("dpo", other)):
        stages.save_stage(str(tmp_path / name), m, {}, step=0)
    pcfg = ppo.Config(eval_prompts=3, max_new_tokens=8)
    out = seeds.expectations(str(tmp_path), pcfg, n=2, device="cpu")
    assert out["samples"] == 2 and out["ppo"]["kl"] == 0.0
    assert out["ppo"]["follow_rate"] == out["sft"]["follow_rate"] and out["ppo"]["win_rate_vs_sft"] == 0.5
    assert out["dpo"]["kl"] > 0
