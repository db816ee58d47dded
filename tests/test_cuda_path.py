"""
The CUDA path, as far as a CPU can run it: every stage under bf16 autocast (what a CUDA run computes in) with
AdamW's fused kernel, a few steps each, finite losses and a checkpoint that loads; and pretraining with --compile.
Nobody here has a GPU, so this is what keeps the code a GPU user runs from rotting.
"""
import json
import math
import os

import pytest
import torch

import dpo
import model
import ppo
import reward
import sft
import stages
import runs
from model import load_model

torch.set_num_threads(1)
TINY_SFT = dict(n_layer=1, n_head=2, n_embd=32, block_size=128, n_docs=100, n_demos=50, pretrain_steps=3,
                sft_steps=3, batch_size=4, eval_prompts=2, max_new_tokens=8, preset="small", device="cpu")


def fused_adamw_on_cpu():
    """Does this torch have AdamW's fused kernel for CPU tensors?"""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Every stage, tiny, with the CPU computing as CUDA would: bf16 autocast, fused AdamW where torch has it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(runs.AUTOCAST, "cpu", torch.bfloat16)
        mp.setitem(runs.FUSED, "cpu", fused_adamw_on_cpu())
        out = str(tmp_path_factory.mktemp("bf16"))
        sft.sft(sft.Config(out_dir=out, **TINY_SFT))  # pretrain (causal LM) first
        sft.pretrain(sft.Config(out_dir=out, stage="pretrain", objective="mlm", **TINY_SFT))
        rcfg = reward.Config(out_dir=out, preset="small", device="cpu", n_prompts=4, k=2, n_eval_pairs=4, steps=3,
                             batch_size=2, eval_prompts=2, bon_prompts=2, bon_max_n=2, max_new_tokens=8,
                             rs_prompts=2, rs_n=2, rs_steps=2)
        reward.train(rcfg)
        reward.rejection_sampling(rcfg)
        ppo.train(ppo.Config(out_dir=out, preset="small", device="cpu", steps=2, batch_size=4,
                             n_epochs=1, n_minibatches=2, max_new_tokens=8, n_prompts=8, eval_prompts=2,
                             sample_every=0))
        dpo.train(dpo.Config(out_dir=out, preset="small", device="cpu", steps=2, batch_size=2,
                             val_frac=0.0, eval_prompts=2, max_new_tokens=8))
    return out


def test_autocast_computes_in_bf16_when_asked(monkeypatch):
    gpt = model.GPT(model.GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(64, (2, 8))
    with runs.autocast("cpu"):
        assert gpt(x)[0].dtype == torch.float32  # the CPU default: full precision
    monkeypatch.setitem(runs.AUTOCAST, "cpu", torch.bfloat16)
    with runs.autocast("cpu"):
        assert gpt(x)[0].dtype == torch.bfloat16


def test_the_optimizer_is_fused_where_asked(monkeypatch):
    if not fused_adamw_on_cpu():
        pytest.skip("this torch has no fused AdamW for CPU tensors")
    monkeypatch.setitem(runs.FUSED, "cpu", True)
    opt = stages.make_optimizer(torch.nn.Linear(4, 4), 1e-3, 0.1, "cpu")
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("stage", ["pretrain", "pretrain_mlm", "sft", "reward", "rejection", "ppo", "dpo"])
def test_every_stage_under_bf16_is_finite_and_loads(chain, stage):
    with open(f"{chain}/{stage}/metrics.json") as f:
        history = json.load(f)["history"]
    losses = [v for row in history for k, v in row.items() if "loss" in k]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    loaded = load_model(f"{chain}/{stage}/model.pt")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_pretraining_with_compile_runs(tmp_path):
    metrics = sft.pretrain(sft.Config(out_dir=str(tmp_path), stage="pretrain", compile=True,
                                      **{**TINY_SFT, "pretrain_steps": 2}))
    assert math.isfinite(metrics["val_loss"])
    load_model(str(tmp_path / "pretrain" / "model.pt"))


# ----------------------------------------------------------------------------- what a GPU user is told

def test_first_line_names_device_dtype_and_preset(capsys, monkeypatch):
    monkeypatch.setattr(runs, "nvidia_gpu_visible", lambda: False)
    runs.parse_config(ppo.Config, ["--device=cpu", "--steps=3"], ppo.PRESETS, ppo.check)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"device cpu | dtype float32 | preset small | torch {torch.__version__}"
    assert lines[1:] == ["override: device = 'cpu'", "override: steps = 3"]


def test_a_gpu_this_torch_cannot_use_is_named_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(runs, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    runs.parse_config(ppo.Config, ["--device=cpu"], ppo.PRESETS, ppo.check)
    err = capsys.readouterr().err
    assert err.startswith("warning: an NVIDIA GPU is visible but torch") and err.count("\n") == 1


def test_requirements_give_a_gpu_machine_the_cuda_build():
    # PyPI's torch is the CUDA build; the CPU index (whose 2.13.0+cpu would win the pin) is CI's choice alone
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "requirements.txt")) as f:
        requirements = [line for line in f if not line.startswith("#")]
    with open(os.path.join(root, ".ci", "run")) as f:
        ci = f.read()
    assert "torch==2.13.0\n" in requirements and not any("download.pytorch.org" in r for r in requirements)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in ci
