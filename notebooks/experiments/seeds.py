"""
One seed is one draw: the whole chain on several seeds, each seed with a chain of its own (pretraining, SFT, the
preference pairs, the reward model, best-of-N, rejection sampling, PPO on the reward model, PPO on the gold
human, DPO), not several PPO seeds on one reward model. Floating-point sums differ between CPUs and thread
counts and the chain amplifies them, so a result is reported as the mean and range over seeds, and a threshold is
judged on the worst seed.

Each seed's stages go to out/seeds/<preset>/seed<s>/, as `python ppo.py --seed=<s>` would lay them out there, and
are reused when they exist and were built the same way (stages.check_reuse), so an interrupted run picks up where it
stopped. After every seed, out/seeds/<preset>/results.json holds each seed's final numbers (no per-step histories):
notebooks/experiments/results.py renders the README's table and notebooks/experiments/RESULTS.md from it.

Run:  python notebooks/experiments/seeds.py [--seeds=1337,3,4] [--preset=small] [--threads=1]
"""
import json
import os
import sys
import time
from dataclasses import dataclass, replace

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the root
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # notebooks/, for lecture.py

import torch  # noqa: E402

import data  # noqa: E402
import dpo  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import stages  # noqa: E402
from frontier import names, run_experiment, timed_run  # noqa: E402
from results import cpu_model  # noqa: E402
from model import load_model, train_dtype  # noqa: E402
from runs import atomic_write, parse_config, pick_device, resolve_preset  # noqa: E402
from stages import run_fields  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out/seeds"
    """each preset's seeds go to <out_dir>/<preset>/seed<s>/, its results to <out_dir>/<preset>/results.json"""
    preset: str = "auto"
    """small, medium, or auto (medium on CUDA): the preset of every stage's Config"""
    device: str = "auto"
    """cpu, cuda, or auto"""
    seeds: str = "1337,3,4"
    """comma-separated seeds: each one the --seed of every stage of its chain"""
    threads: int = 0
    """torch threads (torch.set_num_threads); 0 keeps torch's default. The count changes the order of float sums,
    and so each seed's numbers: results.json records it"""
    rejection: bool = True
    """also rejection sampling (reward.py --stage=rejection)"""
    oracle: bool = True
    """also PPO on the gold human itself (ppo.py --reward=gold): what a perfect reward model would buy"""
    samples: int = 16
    """samples a held-out prompt for the expected follow and win rates the checks are judged on; 0: none. 16: a
    seed's SFT follow rate sat at 0.599 against a bound of 0.60 over 4 samples, closer than 4 samples can tell"""


PRESETS = {"small": {}, "medium": {}}  # the experiment's own fields are the same on both; the preset sizes each stage


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails."""
    yield from run_fields(cfg)
    yield "seeds", seed_list(cfg.seeds) is not None, "comma-separated integers, at least one"
    yield "threads", cfg.threads >= 0, ">= 0"
    yield "samples", cfg.samples >= 0, ">= 0"


def seed_list(text):
    try:
        seeds = [int(s) for s in names(text)]
    except ValueError:
        return None
    return seeds or None


def machine(device="auto"):
    """The machine in words: CPU model, cores, torch version, threads and the supervised steps' dtype."""
    threads = torch.get_num_threads()
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}, "
            f"supervised steps in {train_dtype(pick_device(device))}")


FIELDS = ("gold_reward", "gold_reward_sft", "follow_rate", "follow_rate_sft", "kl", "win_rate_vs_sft")


def summary(path, keys=FIELDS):
    """The final numbers of one stage's metrics.json (no history, no config): {key: value}."""
    with open(path) as f:
        metrics = json.load(f)
    return {k: metrics[k] for k in keys if k in metrics}


def settings(rcfg, pcfg, dcfg):
    """What a seed's reward model, PPO and DPO ran with, for the results' names of the methods
    (results.method_settings)."""
    return {"reward": {k: getattr(rcfg, k) for k in ("steps", "readout", "label_smoothing", "bon_prompts")},
            "ppo": {k: getattr(pcfg, k) for k in ("kl_coef", "adaptive_kl", "target_kl", "kl_coef_floor")},
            "dpo": {k: getattr(dcfg, k) for k in ("beta", "steps", "twins")}}


def expectations(folder, pcfg, n, device):
    """The follow rate, the win rate over SFT and the KL to SFT as expectations, not one draw: n samples a held-out
    prompt from each of SFT, PPO and DPO (ppo.py's eval prompts), the follow rate and the KL averaged over all of
    them, and the win rate over all n * n pairs of a method's sample and SFT's on each prompt (ties half). One draw
    of 256 samples moves a rate by about 0.03; n samples a prompt, by about 0.03 / sqrt(n). Returns {"samples": n,
    model: {"follow_rate", ...}}."""
    prompts = sft.eval_prompts(pcfg.eval_prompts)
    many = [p for p in prompts for _ in range(n)]
    models = {name: load_model(stages.output_path(name, folder), device) for name in ("sft", "ppo", "dpo")}
    texts, kl = {}, {}
    for name, model in models.items():
        torch.manual_seed(pcfg.seed + 5)  # the same draws for the three models, apart from their own weights
        texts[name], p_ids, r_ids, _ = sft.sample(model, many, pcfg.max_new_tokens, device=device, batch_size=128)
        if name != "sft":
            # KL(pi || pi_sft) = E_{y ~ pi}[log pi(y|x) - log pi_sft(y|x)], as sft.evaluate estimates it on one draw
            kl[name] = float((sft.sequence_logprobs(model, p_ids, r_ids, device)
                              - sft.sequence_logprobs(models["sft"], p_ids, r_ids, device)).mean())
    gold = {k: [data.gold_reward(p, t) for p, t in zip(many, v)] for k, v in texts.items()}  # (P * n,) each
    out = {"samples": n}
    for name in texts:
        out[name] = {"follow_rate": sum(map(data.follows, many, texts[name])) / len(many)}
        if name != "sft":
            out[name]["kl"] = kl[name]
            # win rate = mean over prompts i and sample pairs (j, k) of [g(y_ij) > g(sft_ik)], ties half
            wins = [0.5 if a == b else float(a > b) for i in range(len(prompts))
                    for a in gold[name][i * n:(i + 1) * n] for b in gold["sft"][i * n:(i + 1) * n]]
            out[name]["win_rate_vs_sft"] = sum(wins) / len(wins)
    return out


def run_seed(seed, cfg):
    """Every stage of one seed's chain, built where missing; returns the seed's row of results.json."""
    folder = os.path.join(cfg.out_dir, resolve_preset(cfg.preset), f"seed{seed}")
    argv = [f"--preset={cfg.preset}", f"--device={cfg.device}", f"--out_dir={folder}", f"--seed={seed}"]
    scfg, rcfg, pcfg, dcfg = (parse_config(m.Config, argv, m.PRESETS, m.check, quiet=True)
                              for m in (sft, reward, ppo, dpo))
    times_path = os.path.join(folder, "seconds.json")
    seconds = json.load(open(times_path)) if os.path.exists(times_path) else {}

    def timed(name, build):
        t0 = time.time()
        built = build()
        if built:
            seconds[name] = round(time.time() - t0, 1)
            os.makedirs(folder, exist_ok=True)
            with atomic_write(times_path) as f:
                json.dump(seconds, f, indent=1)

    def stage(name, stage_cfg):  # built now (True) or reused as stages.check_reuse allows (False)
        def build():
            existed = os.path.exists(stages.output_path(name, folder))
            stages.ensure_stage(name, stage_cfg)
            return not existed
        return build

    # 1. the shared stages of this seed: pretrain -> SFT -> pairs -> reward model
    timed("pretrain", stage("pretrain", replace(scfg, stage="pretrain")))
    timed("sft", stage("sft", scfg))
    timed("pairs", stage("pairs", rcfg))
    timed("reward", stage("reward", rcfg))
    bcfg = replace(rcfg, stage="best_of_n")
    timed("best_of_n", lambda: timed_run(bcfg, "best_of_n", lambda: reward.best_of_n_stage(bcfg))[1] > 0)
    if cfg.rejection:
        timed("rejection", stage("rejection", replace(rcfg, stage="rejection")))
    # 2. the methods that start from them, each scored against this seed's SFT model on the same held-out prompts
    timed("ppo", lambda: timed_run(pcfg, "ppo", lambda: ppo.train(pcfg))[1] > 0)
    timed("dpo", lambda: timed_run(dcfg, "dpo", lambda: dpo.train(dcfg))[1] > 0)
    if cfg.oracle:
        gold_cfg = replace(pcfg, reward="gold", out_dir=os.path.join(folder, "oracle"))
        device = pick_device(cfg.device)
        fit = lambda: ppo.train(gold_cfg, *ppo.start_models(replace(gold_cfg, out_dir=folder), device))  # noqa: E731
        timed("oracle", lambda: timed_run(gold_cfg, "ppo", fit)[1] > 0)

    # 3. the seed's row: each stage's final numbers
    path = lambda *p: os.path.join(folder, *p, "metrics.json")  # noqa: E731
    with open(path("reward")) as f:
        rm = json.load(f)
    row = {"seed": seed, "seconds": seconds,
           "pretrain": summary(path("pretrain"), ("val_loss", "train_loss", "params")),
           "sft": {**summary(path("sft"), ("gold_reward", "follow_rate", "template_eos_rate", "val_loss")),
                   "pretrained_follow_rate": json.load(open(path("sft")))["pretrained"]["follow_rate"]},
           "reward": {k: rm[k] for k in ("heldout_accuracy", "heldout_accuracy_expected", "label_ceiling",
                                         "label_ceiling_expected", "train_accuracy", "rm_gold_correlation",
                                         "prompt_swap", "heldout_by_term", "baselines") if k in rm},
           "best_of_n": json.load(open(path("best_of_n")))["best_of_n"],
           "ppo": summary(path("ppo")), "dpo": summary(path("dpo")),
           "settings": settings(rcfg, pcfg, dcfg)}
    if cfg.rejection:
        row["rejection"] = summary(path("rejection"))
    if cfg.oracle:
        row["oracle"] = summary(path("oracle", "ppo"))
    if cfg.samples:
        expected_path = os.path.join(folder, "expected.json")
        built_from = {k: stages.record_id(stages.read_record(stages.output_path(k, folder))) for k in ("sft", "ppo", "dpo")}
        old = json.load(open(expected_path)) if os.path.exists(expected_path) else {}
        # of these very models, and with the KL (older ones have none)
        if (old.get("built_from"), old.get("samples"), "kl" in old.get("ppo", {})) != (built_from, cfg.samples, True):
            t0 = time.time()
            expected = {**expectations(folder, pcfg, cfg.samples, pick_device(cfg.device)), "built_from": built_from}
            seconds["expected"] = round(time.time() - t0, 1)
            with atomic_write(expected_path) as f:
                json.dump(expected, f, indent=1)
            with atomic_write(times_path) as f:
                json.dump(seconds, f, indent=1)
        row["expected"] = json.load(open(expected_path))
    return row


def train(cfg):
    """Every seed in turn; results.json is rewritten after each. Returns the results dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = {"preset": resolve_preset(cfg.preset), "machine": machine(cfg.device), "seeds": []}
    out = os.path.join(cfg.out_dir, resolve_preset(cfg.preset), "results.json")
    for seed in seed_list(cfg.seeds):
        results["seeds"].append({**run_seed(seed, cfg), "machine": results["machine"]})
        with atomic_write(out) as f:
            json.dump(results, f, indent=1)
        print(f"== seed {seed} done: {out}")
    return results


def seed_lines(results):
    """One line a seed: what PPO and DPO bought over SFT."""
    return "\n".join(f"seed {r['seed']}: SFT follow {r['ppo']['follow_rate_sft']:.3f} | PPO follow "
                     f"{r['ppo']['follow_rate']:.3f}, win {r['ppo']['win_rate_vs_sft']:.3f}, kl {r['ppo']['kl']:.2f} | "
                     f"DPO follow {r['dpo']['follow_rate']:.3f}, win {r['dpo']['win_rate_vs_sft']:.3f}, "
                     f"kl {r['dpo']['kl']:.2f}" for r in results["seeds"])


if __name__ == "__main__":
    run_experiment(Config, check, train, seed_lines)
