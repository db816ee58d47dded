"""
The reward-KL frontier: PPO vs DPO vs best-of-N, scored by the gold human (the DPO paper's Figure 2, Rafailov et
al. 2023), and the over-optimisation curve of a lightly regularised PPO run (Gao et al. 2022, Figure 1).

Every method buys gold reward with distance from the SFT model; the frontier plots what each one gets per nat:

  SFT           the starting point: KL 0, win rate 0.5 against itself
  best-of-N     N = 1, 2, 4, ... from reward.py's curve; KL(pi_bon || pi_sft) = log N - (N - 1) / N (analytic)
  rejection     reward.py --stage=rejection (best-of-N samples as SFT data), when out/rejection exists
  PPO           one run per beta (kl_coef) in r_t = -beta * kl_t + score * [t = last]
  DPO           one run per beta in r_hat(x, y) = beta * log pi(y|x) / pi_ref(y|x)
  gold oracle   PPO against the gold human itself (ppo.py --reward=gold), one run per beta: what a perfect
                reward model would buy, the line the learned one is measured against
  RLOO, GRPO    ppo.py --advantage=rloo / grpo at PPO's default beta: no critic, G samples a prompt
  rejection->PPO  ppo.py --init=rejection at PPO's default beta (LLaMA-2's order), when out/rejection exists

Each PPO/DPO run starts from fresh copies of the shared SFT model and reward model, loaded from out_dir (built
there once if missing), and writes only its own folder, out/frontier/<method>_beta<b>/<stage>/. A run whose
metrics.json was written with the same config is reused, so an interrupted sweep picks up where it stopped (delete
out/frontier after retraining an earlier stage).

Departures from a like-for-like comparison, which the reader should keep in mind:
  - PPO, DPO, rejection and SFT are scored on the same eval_prompts held-out prompts, their KL estimated on their
    own samples (sum_t log pi - log pi_sft); best-of-N comes from reward.py's curve on the first bon_prompts of
    the same prompts, its first sample the SFT sample (so best-of-1 is the SFT point), with the analytic KL (an
    upper bound; Beirami et al. 2024) and the gold human's win rate over that SFT sample.
  - The over-optimisation curve uses the rollouts of training prompts (ppo.py's per-step history), not the
    held-out prompts; its KL is the rollout estimate, so early points can sit slightly below zero.

Run:  python notebooks/experiments/frontier.py [--preset=small] [--ppo_betas=0.03,0.3] [--dpo_betas=0.1] [--steps=20]
      writes out/frontier/results.json, table.md, frontier.png and overoptimization.png (matplotlib)
"""
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),  # the root
                os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # notebooks/, for lecture.py

import dpo  # noqa: E402
import lecture  # noqa: E402  (notebooks/lecture.py: the running mean the plots below share with the notebooks)
import ppo  # noqa: E402
import reward  # noqa: E402
import sft  # noqa: E402
import stages  # noqa: E402
from model import load_model  # noqa: E402
from runs import atomic_write, deferred_interrupt, one_line_errors, parse_config, pick_device  # noqa: E402
from stages import non_negative, run_fields  # noqa: E402


@dataclass
class Config:
    out_dir: str = "out"
    """where the earlier stages are read (and built if missing) and out/frontier is written"""
    preset: str = "auto"
    """small, medium, or auto (medium on CUDA): the preset of every stage's Config"""
    device: str = "auto"
    """cpu, cuda, or auto"""
    ppo_betas: str = "0.01,0.03,0.1,0.3"
    """PPO's KL coefficients beta, comma-separated: one run each"""
    dpo_betas: str = "0.03,0.1,0.3,1.0"
    """DPO's beta, comma-separated: one run each"""
    bon: bool = True
    """add best-of-N from out/best_of_n/metrics.json, built there if missing (python reward.py --stage=best_of_n:
    reward.best_of_n_curve, N = 1, 2, 4, ..., bon_max_n)"""
    overopt_kl_coef: float = 0.0
    """beta of the over-optimisation run: 0 lets the policy drift as far as the reward model pulls it"""
    overopt_steps: int = 100
    """PPO steps of the over-optimisation run; 0 skips it"""
    steps: int = 0
    """steps of every PPO and DPO sweep run; 0 keeps each stage's preset"""
    oracle_betas: str = "0.03,0.3"
    """PPO against the gold human itself, comma-separated betas: one run each; empty skips it"""
    advantages: str = "rloo,grpo"
    """critic-free advantages (ppo.py --advantage), one run each at PPO's default beta; empty skips them"""
    rs_then_ppo: bool = True
    """PPO from the rejection-sampled model (ppo.py --init=rejection), when out/rejection exists"""


PRESETS = {"small": {}, "medium": {}}  # the sweep's own fields are the same on both; the preset sizes each stage


def check(cfg):
    """What each field allows: runs.parse_config reports the first (field, ok, allowed) row that fails. The runs'
    own configs are checked when train() parses them, before anything is trained."""
    yield from run_fields(cfg)
    yield "ppo_betas", betas(cfg.ppo_betas, lambda b: b >= 0), "comma-separated numbers >= 0"
    yield "dpo_betas", betas(cfg.dpo_betas, lambda b: b > 0), "comma-separated numbers > 0"
    yield "oracle_betas", betas(cfg.oracle_betas, lambda b: b >= 0), "comma-separated numbers >= 0"
    yield "advantages", set(names(cfg.advantages)) <= {"rloo", "grpo"}, "comma-separated: rloo, grpo or both"
    yield from non_negative(cfg, "overopt_kl_coef", "overopt_steps", "steps")


def betas(text, allowed):
    """Whether text is comma-separated numbers, each allowed."""
    try:
        return all(allowed(b) for b in floats(text))
    except ValueError:
        return False


# ----------------------------------------------------------------------------- plots and tables, pure functions

def plot_frontier(rows, ax):
    """The reward-KL frontier on a matplotlib Axes: one line per method through its points in KL order, each point
    labelled with its setting (beta=0.3, N=4) in the line's colour; SFT's setting "-" is left unlabelled."""
    for m, (method, kls, golds, settings) in enumerate(frontier_series(rows)):
        line, = ax.plot(kls, golds, marker="o", label=method)
        for i, (kl, gold, setting) in enumerate(zip(kls, golds, settings)):
            if setting != "-":  # above the point or below it, alternating along a line and between lines
                ax.annotate(setting, (kl, gold), textcoords="offset points", fontsize=7, color=line.get_color(),
                            xytext=(5, 5) if (i + m) % 2 == 0 else (5, -11))
    ax.set(xlabel="KL(pi || pi_sft) (nats)", ylabel="gold reward (mean over held-out prompts)",
           title="Reward-KL frontier: gold reward against KL to SFT")
    ax.margins(x=0.1, y=0.08)  # room for the labels of the outermost points
    ax.set_xlim(left=-0.03 * max(r["kl"] for r in rows))  # KL >= 0: the axis starts just left of SFT
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside the axes: it would hide points


def plot_overoptimization(overopt, ax):
    """Gao et al.'s picture on a matplotlib Axes: the gold reward (left axis) and the RM score (the proxy, right
    axis: another unit) of the rollouts against their KL, each step a faint dot and the 5-step running means
    (lecture.running_mean) as lines. overopt: results["overoptimization"]. Returns the right-hand Axes."""
    history = sorted(overopt["history"], key=lambda h: h["kl"])  # smoothed along the KL axis: the curves never loop
    kls = lecture.running_mean([h["kl"] for h in history])
    proxy_ax = ax.twinx()
    curves = [(ax, "gold", "C1", "gold reward", "gold reward of the rollouts"),
              (proxy_ax, "score", "C0", "RM score (proxy)", "RM score of the rollouts (reward-model units)")]
    handles = []
    for axis, key, color, label, ylabel in curves:
        values = [h[key] for h in history]
        axis.plot([h["kl"] for h in history], values, ".", alpha=0.25, color=color)
        handles += axis.plot(kls, lecture.running_mean(values), color=color,
                             label=f"{label}, mean of 5 steps nearest in KL")
        axis.set_ylabel(ylabel, color=color)
    ax.set(xlabel="KL(pi || pi_sft) of the rollouts (nats)",
           title=f"Over-optimisation: PPO, {overopt['setting']}: gold and proxy against KL")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)  # below: hides no point
    return proxy_ax


def frontier_series(rows):
    """One (method, kls, golds, settings) per method, in order of first appearance, its points in KL order: a sweep
    lists them by beta or N, and a larger beta need not mean a smaller KL, so joining them in that order would draw
    the line back along the KL axis."""
    series = []
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        series.append((method, [r["kl"] for r in points], [r["gold_reward"] for r in points],
                       [r["setting"] for r in points]))
    return series


def markdown_table(rows):
    """The results as a markdown table; a missing win rate (best-of-N) is shown as '-'."""
    lines = ["| method | setting | KL | gold reward | win rate vs SFT |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        win = "-" if r.get("win_rate_vs_sft") is None else f"{r['win_rate_vs_sft']:.3f}"
        lines.append(f"| {r['method']} | {r['setting']} | {r['kl']:.3f} | {r['gold_reward']:+.3f} | {win} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the sweep

def names(text):
    return [n.strip() for n in text.split(",") if n.strip()]


def floats(text):
    return [float(b) for b in names(text)]


def row(method, setting, metrics, seconds=0.0):
    return dict(method=method, setting=setting, kl=metrics["kl"], gold_reward=metrics["gold_reward"],
                win_rate_vs_sft=metrics.get("win_rate_vs_sft"), seconds=round(seconds, 1))


def timed_run(run_cfg, stage, train_fn):
    """(metrics, seconds) of train_fn(), or of the run already saved in run_cfg.out_dir/stage with this config (its
    out_dir aside: it says where a run is, not how it ran, so a run copied from another folder is reused too) and
    from the same SFT model and reward model or pairs, where run_cfg.out_dir holds them (stages.record's parents):
    a PPO run is not reused after its reward model was trained again."""
    path = os.path.join(run_cfg.out_dir, stage, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        settings = lambda c: {k: v for k, v in c.items() if k != "out_dir"}  # noqa: E731
        same_parents = (saved.get("built_from") or {}).get("parents") == stages.record(stage, run_cfg)["parents"]
        if same_parents and settings(saved.get("config", {})) == settings(json.loads(json.dumps(asdict(run_cfg)))):
            print(f"== {path}: done before with this config, reused")
            return saved, 0.0
    print(f"== {run_cfg.out_dir}: training {stage}")
    t0 = time.time()
    metrics = train_fn()
    seconds = time.time() - t0
    print(f"== {run_cfg.out_dir}: {seconds:.0f}s")
    return metrics, seconds


def train(cfg, ppo_cfg=None, dpo_cfg=None):
    """The whole sweep. ppo_cfg and dpo_cfg are the base configs of the runs (default: each stage's preset, with
    cfg.steps); every run changes only beta, and out_dir to its own folder. Returns the results dict."""
    start, device = time.time(), pick_device(cfg.device)
    argv = [f"--preset={cfg.preset}", f"--device={cfg.device}"] + ([f"--steps={cfg.steps}"] if cfg.steps else [])
    # a frontier is one fixed beta a run: not the recipe's KL target, which would bring every beta to one KL
    ppo_cfg = ppo_cfg or parse_config(ppo.Config, argv + ["--adaptive_kl=false"], ppo.PRESETS, ppo.check)
    dpo_cfg = dpo_cfg or parse_config(dpo.Config, argv, dpo.PRESETS, dpo.check)
    # 1. the shared earlier stages, built if missing: pretrain -> SFT -> reward model and its preference pairs
    stages.ensure_stage("reward", cfg)
    sft_path, pairs_path = stages.ensure_stage("sft", cfg), stages.ensure_stage("pairs", cfg)
    folder = os.path.join(cfg.out_dir, "frontier")

    def run_ppo(name, **overrides):
        run_cfg = replace(ppo_cfg, out_dir=os.path.join(folder, name), **overrides)

        def fit():  # fresh copies of the shared stages in cfg.out_dir, as ppo.train would start from them there
            return ppo.train(run_cfg, *ppo.start_models(replace(run_cfg, out_dir=cfg.out_dir), device))
        return timed_run(run_cfg, "ppo", fit)

    def run_dpo(name, **overrides):
        run_cfg = replace(dpo_cfg, out_dir=os.path.join(folder, name), data=pairs_path, **overrides)
        return timed_run(run_cfg, "dpo", lambda: dpo.train(run_cfg, policy=load_model(sft_path, device),
                                                           ref=load_model(sft_path, device)))

    # 2. the SFT model itself, sampled and scored exactly as ppo.train scores its reference
    t0 = time.time()
    sft_eval, _ = sft.evaluate(load_model(sft_path, device), sft.eval_prompts(ppo_cfg.eval_prompts),
                               ppo_cfg.max_new_tokens, device, seed=ppo_cfg.seed)
    rows = [row("SFT", "-", {**sft_eval, "kl": 0.0, "win_rate_vs_sft": 0.5}, time.time() - t0)]
    # 3. best-of-N and rejection sampling, from reward.py's own metrics
    if cfg.bon:
        bon_cfg = stages.stage_config("best_of_n", cfg)
        bon, _ = timed_run(bon_cfg, "best_of_n", lambda: reward.best_of_n_stage(bon_cfg))
        rows += [row("best-of-N", f"N={p['n']}", p) for p in bon["best_of_n"]]
    rejection_path = os.path.join(cfg.out_dir, "rejection", "metrics.json")
    rejection_model = os.path.join(cfg.out_dir, "rejection", "model.pt")
    if os.path.exists(rejection_path):
        with open(rejection_path) as f:
            rejection = json.load(f)
        rows.append(row("rejection sampling", f"best-of-{rejection['config']['rs_n']}", rejection))
    # 4. PPO and DPO, one run per beta, each from fresh copies of the SFT model (and, for PPO, the reward model)
    for beta in floats(cfg.ppo_betas):
        metrics, seconds = run_ppo(f"ppo_beta{beta:g}", kl_coef=beta)
        rows.append(row("PPO", f"beta={beta:g}", metrics, seconds))
    for beta in floats(cfg.dpo_betas):
        metrics, seconds = run_dpo(f"dpo_beta{beta:g}", beta=beta)
        rows.append(row("DPO", f"beta={beta:g}", metrics, seconds))
    # 5. beyond the seeds' PPO: the gold oracle, the critic-free advantages, rejection sampling before PPO
    for beta in floats(cfg.oracle_betas):
        # on g's own scale, as the shipped runs were made: beta on g is 2 beta on ppo.py's oracle, g / tau
        metrics, seconds = run_ppo(f"ppo_gold_beta{beta:g}", kl_coef=beta, reward="gold", gold_scale=1.0)
        rows.append(row("PPO on the gold human", f"beta={beta:g}", metrics, seconds))
    for advantage in names(cfg.advantages):
        metrics, seconds = run_ppo(f"ppo_{advantage}", advantage=advantage)
        rows.append(row(advantage.upper(), f"beta={ppo_cfg.kl_coef:g}, G={ppo_cfg.group_size}", metrics, seconds))
    if cfg.rs_then_ppo and os.path.exists(rejection_model):
        metrics, seconds = run_ppo("ppo_from_rejection", init="rejection")
        rows.append(row("rejection -> PPO", f"beta={ppo_cfg.kl_coef:g}", metrics, seconds))
    results = {"rows": rows}
    # 6. over-optimisation: a long PPO run with little or no KL penalty; RM score and gold of its rollouts per step
    if cfg.overopt_steps:
        metrics, seconds = run_ppo("ppo_overopt", kl_coef=cfg.overopt_kl_coef, steps=cfg.overopt_steps)
        setting = f"beta={cfg.overopt_kl_coef:g}, {cfg.overopt_steps} steps"
        results["overoptimization"] = {**row("PPO", setting, metrics, seconds),
                                       "history": [{k: h[k] for k in ("step", "kl", "score", "gold")}
                                                   for h in metrics["history"]]}
    results["seconds"] = round(time.time() - start, 1)  # everything, building the earlier stages included
    write_outputs(folder, results)
    return results


def write_outputs(folder, results):
    """results.json, table.md, frontier.png and (with an over-optimisation run) overoptimization.png."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no window, also on a machine without a display
    import matplotlib.pyplot as plt

    def png(draw, arg):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        draw(arg, ax)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    files = {"results.json": json.dumps(results, indent=1).encode(),
             "table.md": markdown_table(results["rows"]).encode(), "frontier.png": png(plot_frontier, results["rows"])}
    if "overoptimization" in results:
        files["overoptimization.png"] = png(plot_overoptimization, results["overoptimization"])
    with deferred_interrupt():  # the files together: Ctrl-C waits until they are written
        for name, content in files.items():
            with atomic_write(os.path.join(folder, name), "wb") as f:
                f.write(content)
    print(f"wrote {', '.join(files)} to {folder}")


def save_rows(folder, rows, table):
    """An experiment's results, written atomically: folder/results.json ({"rows": rows}) and folder/table.md."""
    for name, text in [("results.json", json.dumps({"rows": rows}, indent=1)), ("table.md", table)]:
        with atomic_write(os.path.join(folder, name)) as f:
            f.write(text)


def run_experiment(config_cls, check, train, markdown_table):
    """The main() of notebooks/experiments/online.py and rm_size.py: parse the flags, train, print the table."""
    cfg = parse_config(config_cls, presets=PRESETS, check=check)
    with one_line_errors():
        rows = train(cfg)
    print(markdown_table(rows))


def main():
    cfg = parse_config(Config, presets=PRESETS, check=check)
    with one_line_errors():
        results = train(cfg)
    for r in results["rows"] + ([results["overoptimization"]] if "overoptimization" in results else []):
        print(f"{r['method']:>18} {r['setting']:<22} {r['seconds']:7.0f}s")
    print(f"{'total':>18} {'':<22} {results['seconds']:7.0f}s\n\n{markdown_table(results['rows'])}")


if __name__ == "__main__":
    main()
