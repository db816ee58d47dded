"""
Each stage records what it was built from (stages.record), and a later stage reuses it only when that is what the run
asks for (stages.check_reuse): the issue's cases, each with a tiny pretrain -> sft chain.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import ppo
import reward
import sft
import stages
from model import load_checkpoint, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=2, sft_steps=2,
            batch_size=4, eval_prompts=2, max_new_tokens=8, preset="small", device="cpu")


@pytest.fixture
def chain(tmp_path):
    """A tiny pretrain -> sft chain in tmp_path: (its sft Config, the sft record)."""
    cfg = sft.Config(out_dir=str(tmp_path), **TINY)
    sft.sft(cfg)
    return cfg, load_checkpoint(str(tmp_path / "sft" / "model.pt"))["built_from"]


def test_a_stage_records_its_settings_its_parent_and_the_world(chain):
    cfg, rec = chain
    pretrain = load_checkpoint(os.path.join(cfg.out_dir, "pretrain", "model.pt"))["built_from"]
    assert rec["stage"] == "sft" and rec["preset"] == "small" and rec["world"] == data.fingerprint()
    assert rec["settings"]["sft_steps"] == 2 and "eval_prompts" not in rec["settings"]  # what shapes it, only
    assert rec["parents"] == {"pretrain": stages.record_id(pretrain)} and pretrain["settings"]["n_embd"] == 32
    assert stages.record("sft", cfg) == rec  # asked again with the same settings: the same record


def test_the_same_settings_are_reused_without_work(chain, monkeypatch):
    cfg, _ = chain
    monkeypatch.setattr(sft, "pretrain", lambda cfg: pytest.fail("rebuilt"))
    monkeypatch.setattr(sft, "sft", lambda cfg: pytest.fail("rebuilt"))
    assert stages.ensure_stage("sft", cfg) == os.path.join(cfg.out_dir, "sft", "model.pt")


def test_other_settings_of_the_stage_asked_for_stop_the_run(chain):
    cfg, _ = chain
    with pytest.raises(stages.StageMismatch, match=r"^stage 'sft': .* was built with sft_steps=2 \(this run: 5\); "
                                                r"delete .*sft/ to rebuild it, or pass --out_dir="):
        stages.ensure_stage("sft", dataclasses.replace(cfg, sft_steps=5))


def test_another_world_or_preset_stops_the_run(chain, monkeypatch):
    cfg, _ = chain
    with pytest.raises(stages.StageMismatch, match=r"the small preset \(this run: medium\)"):
        stages.check_reuse("sft", dataclasses.replace(cfg, preset="medium"))
    monkeypatch.setattr(data, "fingerprint", lambda: "0000beef")
    with pytest.raises(stages.StageMismatch, match=r"another world or tokenizer"):
        stages.ensure_stage("sft", cfg)


def test_a_rebuilt_parent_stops_the_run(chain):
    cfg, _ = chain
    sft.pretrain(dataclasses.replace(cfg, stage="pretrain", seed=7))  # out/pretrain rebuilt under out/sft
    with pytest.raises(stages.StageMismatch, match=r"^stage 'sft': .* was built with another .*pretrain/model.pt "
                                                r"\(rebuilt or removed since\); seed=1337 \(this run: 7\)"):
        stages.check_reuse("sft", dataclasses.replace(cfg, seed=7))
    with pytest.raises(stages.StageMismatch, match=r"another .*pretrain/model.pt \(rebuilt or removed since\)"):
        stages.check_reuse("sft", reward.Config(out_dir=cfg.out_dir, preset="small", device="cpu"))


def test_a_later_script_reuses_a_stage_built_with_other_settings_and_says_so(chain, capsys):
    # reward.py does not state the SFT settings: it asks for the preset's, and prints how this SFT model differs
    cfg, _ = chain
    stages.check_reuse("sft", reward.Config(out_dir=cfg.out_dir, preset="small", device="cpu"))
    out = capsys.readouterr().out
    assert "== reusing" in out and "sft_steps=2 (this run: 900)" in out and "n_embd=32 (this run: 128)" in out


def test_a_later_script_builds_the_earlier_stages_with_its_own_seed(chain, capsys):
    # python ppo.py --seed=3 builds (and expects) seed 3's chain, as notebooks/experiments/seeds.py does: every stage its --seed
    later = ppo.Config(out_dir="unused", preset="small", device="cpu", seed=3)
    assert [stages.stage_config(s, later).seed for s in ("pretrain", "sft", "pairs", "reward")] == [3, 3, 3, 3]
    assert stages.stage_config("pretrain", later).n_embd == sft.Config().n_embd  # the rest: the preset's defaults
    cfg, _ = chain  # built with seed 1337: a later script of seed 3 says so when it reuses it
    stages.check_reuse("sft", reward.Config(out_dir=cfg.out_dir, preset="small", device="cpu", seed=3))
    assert "seed=1337 (this run: 3)" in capsys.readouterr().out


def test_a_stage_records_the_dtype_it_trained_in_and_is_not_reused_in_another(chain):
    import model
    cfg, rec = chain
    assert rec["settings"]["train_dtype"] == model.train_dtype("cpu")  # --train_dtype=auto, as it is on this CPU
    other = {"bfloat16": "float32", "float32": "bfloat16"}[rec["settings"]["train_dtype"]]
    with pytest.raises(stages.StageMismatch, match=rf"train_dtype='{rec['settings']['train_dtype']}' "
                                                rf"\(this run: '{other}'\)"):
        stages.ensure_stage("sft", dataclasses.replace(cfg, train_dtype=other))
    later = ppo.Config(out_dir=cfg.out_dir, preset="small", device="cpu", train_dtype="float32")
    assert stages.stage_config("sft", later).train_dtype == "float32"  # python ppo.py --train_dtype: every stage's
    assert "train_dtype" not in stages.record("ppo", later)["settings"]  # PPO trains in sampling's dtype


def test_an_output_without_a_record_is_not_reused(tmp_path):
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "pairs.jsonl").write_text("")
    with pytest.raises(stages.StageMismatch, match=r"pairs.jsonl has no record of what it was built from"):
        stages.ensure_stage("pairs", reward.Config(out_dir=str(tmp_path), preset="small", device="cpu"))


def test_the_issue_example_stops_before_any_work_in_one_line(tmp_path):
    # python sft.py --stage=pretrain --n_embd=32, then python sft.py --n_embd=64: the second must not fine-tune
    # the 32-wide model
    flags = [f"--out_dir={tmp_path}", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_docs=100", "--n_demos=50",
             "--pretrain_steps=2", "--sft_steps=2", "--batch_size=4", "--eval_prompts=2", "--max_new_tokens=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda *more: subprocess.run([sys.executable, "sft.py", *flags, *more], cwd=ROOT, env=env,
                                       capture_output=True, text=True, timeout=300)
    assert run("--stage=pretrain", "--n_embd=32").returncode == 0
    result = run("--n_embd=64")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: stage 'pretrain': {tmp_path}/pretrain/model.pt was built with n_embd=32 "
                                    f"(this run: 64); delete {tmp_path}/pretrain/ to rebuild it")
    assert not os.path.exists(tmp_path / "sft")


def test_ppo_from_rejection_sampling_records_that_parent_too(chain):
    cfg, _ = chain
    stub = {"stage": "rejection", "settings": {}}  # a stand-in rejection-sampled model: only its record is read
    policy = load_model(os.path.join(cfg.out_dir, "sft", "model.pt"), "cpu")
    stages.save_stage(os.path.join(cfg.out_dir, "rejection"), policy, {}, step=0, built_from=stub)
    from_sft = stages.record("ppo", ppo.Config(out_dir=cfg.out_dir, preset="small"))
    from_rs = stages.record("ppo", ppo.Config(out_dir=cfg.out_dir, preset="small", init="rejection"))
    assert "rejection" not in from_sft["parents"] and from_sft["settings"]["init"] == "sft"
    assert from_rs["parents"]["rejection"] == stages.record_id(stub) and from_rs["settings"]["init"] == "rejection"


def test_the_chain_times_each_stage_it_builds_on_its_own(tmp_path, monkeypatch, capsys):
    """Each stage's time leaves out the stages it built first: with a clock that ticks 10 s a read, building sft
    (which builds pretrain first) records each stage's own seconds, and time_lines prints one line a stage, the
    run's own stage and the total, and keeps them in <out_dir>/<stage>/times.json."""
    monkeypatch.setattr(stages, "BUILT", {})
    ticks = iter(range(0, 10_000, 10))
    monkeypatch.setattr(stages.time, "time", lambda: float(next(ticks)))
    cfg = ppo.Config(out_dir=str(tmp_path), preset="small", device="cpu")
    built = []

    def fake_build(name, inner=None):
        def build(stage_cfg):
            built.append(name)
            if inner:
                stages.ensure_stage(inner, cfg)
            os.makedirs(os.path.dirname(stages.output_path(name, cfg.out_dir)), exist_ok=True)
            open(stages.output_path(name, cfg.out_dir), "w").close()
        return build
    monkeypatch.setattr(sft, "pretrain", fake_build("pretrain"))
    monkeypatch.setattr(sft, "sft", fake_build("sft", inner="pretrain"))
    monkeypatch.setattr(stages, "stage_config", lambda stage, cfg: cfg)
    stages.ensure_stage("sft", cfg)
    assert built == ["sft", "pretrain"]
    # sft: read at 0 and 30, pretrain within it at 10 and 20: pretrain 10 s, sft 30 - 10 = 20 s of its own
    assert stages.BUILT == {"pretrain": 10.0, "sft": 20.0}
    stages.time_lines(cfg, "ppo", 90.0)
    lines = capsys.readouterr().out.splitlines()[-4:]
    assert [line.split(" | ")[1].strip() for line in lines] == ["pretrain", "sft", "ppo", "total"]
    with open(os.path.join(cfg.out_dir, "ppo", "times.json")) as f:
        record = json.load(f)
    assert record["seconds"] == {"pretrain": 10.0, "sft": 20.0, "ppo": 60.0} and record["total"] == 90.0
