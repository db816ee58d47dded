"""
Data parallelism under torchrun, on the CPU with 2 gloo processes: pretraining ends with the weights one process
reaches on the same global batch; every stage runs as 2 processes and leaves one checkpoint and one metrics.json;
a failure in one process ends the other, in one line. In-process: a process group of one computes bit for bit what
no process group computes, the global batch must split into the processes, and --device=auto picks CUDA, then
Apple's GPU, then the CPU. A torchrun start costs seconds (three Pythons importing torch), so the stages share one
(tests/torchrun_driver.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import data
import ppo
import sft
import stages
import runs
from model import GPT, GPTConfig, ScalarHeadModel, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)
# float32: the processes' shares of a batch round apart in bf16, and these tests compare weights to 1e-6
TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=3, sft_steps=2,
            pretrain_batch_size=4, batch_size=4, eval_prompts=2, max_new_tokens=8, preset="small", device="cpu",
            train_dtype="float32")


def flags(**fields):
    return [f"--{k}={v}" for k, v in fields.items()]


def torchrun(*args, timeout=240):
    """python -m torch.distributed.run --standalone --nproc_per_node=2 args..., one thread a process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def test_two_processes_pretrain_to_the_weights_of_one(tmp_path):
    # each process takes 2 of the 4 windows of every step; the mean of their gradients is the whole batch's
    two = torchrun("sft.py", "--stage=pretrain", f"--out_dir={tmp_path / 'two'}", *flags(**TINY))
    assert two.returncode == 0, two.stderr[-3000:]
    one = sft.pretrain(sft.Config(stage="pretrain", out_dir=str(tmp_path / "one"), **TINY))
    a = load_checkpoint(str(tmp_path / "one" / "pretrain" / "model.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "two" / "pretrain" / "model.pt"))["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name  # measured: 1e-7 apart
    with open(tmp_path / "two" / "pretrain" / "metrics.json") as f:
        logged = json.load(f)
    assert [h["loss"] for h in logged["history"]] == pytest.approx([h["loss"] for h in one["history"]], rel=1e-5)
    assert logged["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert two.stdout.count("step 00000") == 1  # one log: rank 0's


def test_every_stage_runs_as_two_processes_and_writes_once(tmp_path):
    at, sub = f"--out_dir={tmp_path}", {k: TINY[k] for k in ("preset", "device", "max_new_tokens", "eval_prompts")}
    rm = dict(n_prompts=4, k=2, n_eval_pairs=4, steps=2, batch_size=2, bon_prompts=2, bon_max_n=2, rs_prompts=2,
              rs_n=2, rs_steps=2, **sub)
    rl = dict(steps=2, batch_size=4, n_epochs=1, n_minibatches=2, n_prompts=8, sample_every=0, **sub)
    for kind in ("rloo", "grpo"):  # an out_dir of their own for out/ppo, sharing the stages before it
        os.makedirs(tmp_path / kind)
        for stage in ("pretrain", "sft", "reward"):
            os.symlink(tmp_path / stage, tmp_path / kind / stage)
    runs = [["sft", "--stage=pretrain", "--objective=mlm", at, *flags(**TINY)], ["sft", at, *flags(**TINY)],
            ["reward", at, *flags(**rm)], ["reward", "--stage=rejection", at, *flags(**rm)],
            ["ppo", "--adaptive_kl=true", at, *flags(**rl)],
            ["ppo", "--advantage=rloo", "--group_size=2", f"--out_dir={tmp_path / 'rloo'}", *flags(**rl)],
            ["ppo", "--advantage=grpo", "--group_size=2", f"--out_dir={tmp_path / 'grpo'}", *flags(**rl)],
            ["dpo", "--steps=2", "--batch_size=2", "--val_frac=0.5", "--eval_every=1", at, *flags(**sub)]]
    args = [a for run in runs for a in [*run, "--"]][:-1]
    result = torchrun("tests/torchrun_driver.py", "checks", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    files = {stage: sorted(os.listdir(tmp_path / stage)) for stage in
             ("pretrain", "pretrain_mlm", "sft", "rejection", "ppo", "rloo/ppo", "grpo/ppo", "dpo")}
    # a run of ppo.py also keeps the chain's time per stage beside its output (stages.time_lines)
    assert all(f == ["metrics.json", "model.pt"] + ["times.json"] * stage.endswith("ppo")
               for stage, f in files.items()), files
    assert sorted(os.listdir(tmp_path / "reward")) == ["metrics.json", "model.pt", "pairs.jsonl",
                                                       "pairs.jsonl.built_from.json"]
    with open(tmp_path / "grpo" / "ppo" / "metrics.json") as f:
        assert json.load(f)["config"]["advantage"] == "grpo"
    # rank 0 alone prints: each run's first line once
    assert result.stdout.count(f"device cpu | dtype float32 | preset small | torch {torch.__version__} | "
                               f"processes 2\n") == len(runs), result.stdout[-3000:]


def test_a_failure_in_one_process_ends_both_in_one_line(tmp_path):
    # rank 1 fails before its second step's gradients, while rank 0 waits for them in the all-reduce
    result = torchrun("tests/torchrun_driver.py", "--fail_at_step=1", "sft", "--stage=pretrain",
                      f"--out_dir={tmp_path}", *flags(**TINY), timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 gives up at step 1"], result.stderr[-3000:]
    assert "[rank0]" not in result.stderr and "[rank1]" not in result.stderr  # no process's traceback
    assert not os.path.exists(tmp_path / "pretrain")


# ----------------------------------------------------------------------------- in-process

def tiny_models():
    torch.manual_seed(0)
    policy = GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=96, n_layer=1, n_head=2, n_embd=32))
    return policy, ScalarHeadModel.from_gpt(policy)


def run_both(tmp_path, name):
    """Pretraining and a tiny PPO (whitening, the adaptive KL, the evaluation on rank 0): their weights."""
    sft.pretrain(sft.Config(stage="pretrain", out_dir=str(tmp_path / name), **TINY))
    policy, critic = tiny_models()
    cfg = ppo.Config(out_dir=str(tmp_path / name), device="cpu", steps=2, batch_size=4, n_epochs=1, n_minibatches=2,
                     max_new_tokens=8, n_prompts=8, eval_prompts=2, sample_every=0, adaptive_kl=True)
    ppo.train(cfg, policy=policy, ref=tiny_models()[0], critic=critic,
              reward_fn=lambda ids, mask, P: (ids[:, P:] < 256).float().mean(1))
    return [load_checkpoint(str(tmp_path / name / stage / "model.pt"))["model"] for stage in ("pretrain", "ppo")]


def test_a_process_group_of_one_computes_bit_for_bit_what_none_computes(tmp_path):
    plain = run_both(tmp_path, "plain")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert runs.distributed()
        grouped = run_both(tmp_path, "grouped")
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain, grouped):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_global_batch_must_split_into_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match=r"^error: --batch_size=6: must be a multiple of 4, so that each of the 4 "
                                         r"processes torchrun started takes an equal share$"):
        with runs.data_parallel(sft.Config(batch_size=6), "batch_size"):
            pytest.fail("no work may start")
    cfg = ppo.Config(batch_size=8, n_minibatches=2, advantage="grpo", group_size=4)
    with pytest.raises(SystemExit, match=r"must be a multiple of 16, .* equal share, a multiple of 4$"):
        with runs.data_parallel(cfg, "batch_size", 4):
            pytest.fail("no work may start")
    monkeypatch.setenv("RANK", "1")  # the others leave without a word, so rank 0's line is the one printed
    with pytest.raises(SystemExit) as stopped:
        with runs.data_parallel(sft.Config(batch_size=6), "batch_size"):
            pass
    assert stopped.value.code == 0


def test_a_process_other_than_rank_0_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs.parse_config(ppo.Config, ["--device=cpu", "--steps=3"], ppo.PRESETS, ppo.check)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_apples_gpu_then_the_cpu(monkeypatch, cuda, mps, picked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert runs.pick_device("auto") == picked
    assert stages.device_exists("mps") == mps
    assert runs.AUTOCAST["mps"] is None and runs.FUSED["mps"] is False  # MPS runs the CPU's code
    assert runs.to_device(torch.zeros(2), "cpu").device.type == "cpu"


def test_under_torchrun_cuda_is_the_gpu_of_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert runs.pick_device("auto") == runs.pick_device("cuda") == "cuda:3"
    assert runs.pick_device("cpu") == "cpu"
