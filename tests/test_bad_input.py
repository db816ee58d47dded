"""Bad input gets one line and leaves nothing behind: a table of bad flags for every script, each run as a
subprocess (exit status, the single line, an empty out_dir); every Config field covered by its script's check; the
longest prompt against every prompt the world can make; a nan reward or a diverging loss in tiny runs of the stages;
truncated and foreign checkpoints; Ctrl-C while a file is written, while a stage is saved, and during training."""
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import data
import dpo
import ppo
import reward
import sft
import stages
import runs
from model import GPT, GPTConfig, ScalarHeadModel, load_model, save_checkpoint
from runs import CheckpointError, Diverged, atomic_write, one_line_errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import frontier  # noqa: E402
import seeds  # noqa: E402

torch.set_num_threads(1)
SCRIPTS = {"sft.py": sft, "reward.py": reward, "ppo.py": ppo, "dpo.py": dpo, "notebooks/experiments/frontier.py": frontier,
           "notebooks/experiments/seeds.py": seeds}


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(script, *flags):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


# ----------------------------------------------------------------------------- bad flags: one line, before any work

BAD_FLAGS = [
    ("sft.py", ["--n_head=3"], "--n_head=3: must be a divisor of --n_embd=128"),
    ("sft.py", ["--block_size=8"], "--block_size=8: must be >= "),
    ("sft.py", ["--max_new_tokens=5000"], "--max_new_tokens=5000: must be <= "),
    ("sft.py", ["--stage=rl"], "--stage=rl: must be one of pretrain, sft"),
    ("sft.py", ["--dropout=1.5"], "--dropout=1.5: must be in [0, 1)"),
    ("sft.py", ["--data=no/such/demos.jsonl"], "--data=no/such/demos.jsonl: must be an existing file"),
    ("reward.py", ["--tau=0"], "--tau=0.0: must be > 0"),
    ("reward.py", ["--k=1"], "--k=1: must be >= 2"),
    ("reward.py", ["--label_smoothing=0.5"], "--label_smoothing=0.5: must be in [0, 0.5)"),
    ("reward.py", ["--stage=ppo"], "--stage=ppo: must be one of reward, best_of_n, rejection"),
    ("reward.py", ["--eval_prompts=50000"], "--eval_prompts=50000: must be at most what the world has"),
    ("reward.py", ["--weight_decay=-0.1"], "--weight_decay=-0.1: must be >= 0"),
    ("reward.py", ["--val_frac=1"], "--val_frac=1.0: must be in [0, 1)"),
    ("ppo.py", ["--batch_size=-4"], "--batch_size=-4: must be > 0"),
    ("ppo.py", ["--kl_coef=-1"], "--kl_coef=-1.0: must be >= 0"),
    ("ppo.py", ["--n_minibatches=3"], "--n_minibatches=3: must be a divisor of --batch_size=64"),
    ("ppo.py", ["--gamma=1.5"], "--gamma=1.5: must be in [0, 1]"),
    ("ppo.py", ["--max_new_tokens=5000"], "--max_new_tokens=5000: must be <= "),
    ("ppo.py", ["--device=tpu"], "--device=tpu: must be auto, cpu"),
    ("sft.py", ["--train_dtype=fp16"], "--train_dtype=fp16: must be one of auto, bfloat16, float32"),
    ("dpo.py", ["--beta=0", "--loss_type=ipo"], "--beta=0.0: must be > 0"),
    ("dpo.py", ["--steps=-5"], "--steps=-5: must be > 0"),
    ("dpo.py", ["--beta=-1"], "--beta=-1.0: must be > 0"),
    ("dpo.py", ["--loss_type=ipo", "--label_smoothing=0.1"], "--label_smoothing=0.1: must be 0 with --loss_type=ipo"),
    ("dpo.py", ["--val_frac=1"], "--val_frac=1.0: must be in [0, 1)"),
    ("notebooks/experiments/frontier.py", ["--ppo_betas=0.1,abc"], "--ppo_betas=0.1,abc: must be comma-separated numbers >= 0"),
    ("notebooks/experiments/frontier.py", ["--dpo_betas=0"], "--dpo_betas=0: must be comma-separated numbers > 0"),
    ("notebooks/experiments/frontier.py", ["--steps=-1"], "--steps=-1: must be >= 0"),
    ("notebooks/experiments/frontier.py", ["--overopt_steps=ten"], "--overopt_steps=ten: must be an integer"),
    ("notebooks/experiments/seeds.py", ["--seeds=1,x"], "--seeds=1,x: must be comma-separated integers, at least one"),
    ("notebooks/experiments/seeds.py", ["--threads=-1"], "--threads=-1: must be >= 0"),
]


@pytest.mark.parametrize("script, flags, expected", BAD_FLAGS, ids=[f"{s} {' '.join(f)}" for s, f, _ in BAD_FLAGS])
def test_bad_flag_gets_one_line_and_writes_nothing(tmp_path, script, flags, expected):
    result = run(script, f"--out_dir={tmp_path}", "--device=cpu", *flags)  # the row's flags come last and win
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("\n") == 1 and output.startswith("error: ") and expected in output, output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("preset", ["small", "medium"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_field_is_checked_and_the_presets_pass(script, preset):
    """Each script's check(cfg) has a row for every field that can hold a bad value (a bool cannot; the preset is
    checked while parse_config applies it), and the presets pass every row."""
    module = SCRIPTS[script]
    cfg = dataclasses.replace(module.Config(), **module.PRESETS[preset], preset=preset, device="cpu")
    rows = list(module.check(cfg))
    assert {field for field, _, _ in rows} == {f.name for f in dataclasses.fields(module.Config)
                                              if type(f.default) is not bool and f.name != "preset"}
    failed = [f"--{field}={getattr(cfg, field)}: must be {allowed}" for field, ok, allowed in rows if not ok]
    assert failed == []


def test_longest_prompt_against_every_prompt_the_world_can_make():
    slots = dict(N=data.NAMES, A=data.ANIMALS, P=data.PLACES, adj=data.ADJS)
    longest = 0
    for instruction, input in [(t, "") for t in data.INSTRUCTIONS] + [(data.CONTINUE, t) for t in data.OPENINGS]:
        used = [k for k in slots if "{" + k + "}" in instruction + input]
        for words in itertools.product(*(slots[k] for k in used)):
            fill = dict(zip(used, words))
            prompt = data.alpaca_prompt(instruction.format(**fill), input.format(**fill))
            longest = max(longest, len(data.encode(prompt)))
    assert sft.longest_prompt_tokens() == longest


# ----------------------------------------------------------------------------- a diverged run writes nothing

def tiny_gpt(block_size=96):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=data.tokenizer().n_vocab, block_size=block_size, n_layer=1, n_head=2, n_embd=32))


def test_ppo_stops_at_a_nan_reward(tmp_path):
    policy = tiny_gpt(72)
    cfg = ppo.Config(out_dir=str(tmp_path), device="cpu", steps=3, batch_size=4, n_epochs=1, n_minibatches=1,
                     max_new_tokens=4, n_prompts=8, eval_prompts=2, sample_every=0)
    nan_reward = lambda ids, attention_mask, P: torch.full((ids.size(0),), float("nan"))
    with pytest.raises(Diverged, match=r"^step 0: score is nan$"):
        ppo.train(cfg, policy=policy, ref=tiny_gpt(72), critic=ScalarHeadModel(policy.config), reward_fn=nan_reward)
    assert os.listdir(tmp_path) == []


def test_dpo_stops_when_its_loss_diverges(tmp_path):
    # lr = 1e30: the first AdamW step moves every weight by about 1e30, and the next forward overflows
    pairs = [{"prompt": data.alpaca_prompt(f"Write a story about {n}."), "chosen": f"{n} was happy. The end.",
              "rejected": f"{n} was sad and"} for n in ["Tom", "Lily", "Ben", "Mia"]]
    runs.save_jsonl(str(tmp_path / "pairs.jsonl"), pairs)
    cfg = dpo.Config(data=str(tmp_path / "pairs.jsonl"), out_dir=str(tmp_path), device="cpu", steps=3, batch_size=2,
                     lr=1e30, warmup=0, val_frac=0.0, eval_prompts=2, max_new_tokens=4)
    stages.save_stage(str(tmp_path / "sft"), tiny_gpt(), {}, step=0, built_from=stages.record("sft", cfg))
    with pytest.raises(Diverged, match=r"^step 1: loss is (nan|inf)$"):
        dpo.train(cfg)
    assert sorted(os.listdir(tmp_path)) == ["pairs.jsonl", "sft"]  # the earlier stage is untouched


def test_reward_model_training_stops_when_its_loss_diverges():
    rm = ScalarHeadModel(tiny_gpt().config)
    pairs = [{"prompt": data.alpaca_prompt("Write a story about Tom."), "chosen": "Tom was happy. The end.",
              "rejected": "Tom was sad and"}] * 4
    cfg = reward.Config(steps=3, batch_size=2, lr=1e30)
    with pytest.raises(Diverged, match=r"^step 1: loss is (nan|inf)$"):
        reward.train_reward_model(rm, pairs, cfg, "cpu")


TINY_PRETRAIN = ["--stage=pretrain", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--n_docs=100",
                 "--batch_size=4"]


def test_pretraining_that_diverges_says_so_in_one_line(tmp_path):
    result = run("sft.py", f"--out_dir={tmp_path}", *TINY_PRETRAIN, "--pretrain_steps=5", "--lr=1e30")
    assert result.returncode == 1
    assert re.fullmatch(r"error: step 1: loss is (nan|inf); nothing was written\n", result.stderr), result.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- checkpoints that are not ours

@pytest.mark.parametrize("damage", ["truncated", "foreign", "unknown kind", "other config"])
def test_bad_checkpoint_gives_one_line_naming_the_file(tmp_path, damage):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, tiny_gpt())
    if damage == "truncated":
        with open(path, "rb") as f:
            head = f.read(1000)
        with open(path, "wb") as f:
            f.write(head)
    elif damage == "foreign":
        torch.save({"a": 1}, path)
    else:
        ckpt = torch.load(path, weights_only=True)
        if damage == "unknown kind":
            ckpt["kind"] = "LSTM"
        else:
            ckpt["config"]["n_experts"] = 8
        torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(path + ": ")
    assert message.endswith("delete it or rerun the stage that writes it")


def test_cli_with_a_truncated_checkpoint(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "model.pt").write_bytes(b"PK\x03\x04 not the rest of a checkpoint")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    result = run("dpo.py", f"--out_dir={tmp_path}", "--device=cpu", f"--data={pairs}")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'sft' / 'model.pt'}: not a readable checkpoint")
    assert result.stderr.endswith("; delete it or rerun the stage that writes it\n")


# ----------------------------------------------------------------------------- Ctrl-C

def test_atomic_write_interrupted_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(path)) as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["metrics.json"] and path.read_text() == "old"


def test_ctrl_c_while_a_stage_is_saved_waits_for_both_files(tmp_path, monkeypatch):
    write_metrics = stages.write_metrics

    def interrupted_write(out_dir, metrics):  # Ctrl-C arrives between the stage's two files
        write_metrics(out_dir, metrics)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(stages, "write_metrics", interrupted_write)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        stages.save_stage(str(tmp_path / "sft"), tiny_gpt(), {"loss": 1.0}, step=3)
    assert sorted(os.listdir(tmp_path / "sft")) == ["metrics.json", "model.pt"]
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_main_turns_ctrl_c_into_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        with one_line_errors():
            raise KeyboardInterrupt
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted; nothing half-written\n"


def test_ctrl_c_during_pretraining(tmp_path):
    # a shell that starts jobs in the background hands them SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: the child gets the default back, as a user's terminal gives it
    proc = subprocess.Popen([sys.executable, "sft.py", f"--out_dir={tmp_path}", *TINY_PRETRAIN,
                             "--pretrain_steps=100000"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:
            if line.startswith("step 00002"):
                proc.send_signal(signal.SIGINT)
                break
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130
        assert err == "interrupted; nothing half-written\n"
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(tmp_path) == []
