"""
The lecture notebooks' shared helpers, in one place so that no notebook carries a pasted copy:

  quiet()            runs a training function without its step log: stages.log prints one line per step, which a
                     stored notebook should not repeat; the notebook prints a short summary instead
  running_mean       the mean of the k values around each step (also the smoothing of frontier.py's plots)
  plot_curve         a noisy per-step curve on one Axes: the raw values faint, their running mean on top
  plot_history       a run's per-step history, one panel per unit (nats, fraction of pairs, ...)
  plot_best_of_n     reward.py's best-of-N curve: gold reward and RM score against KL, each point labelled N
  load_metrics       a real run's out/<stage>/metrics.json, or one line saying which command writes it

Each notebook's first cell puts the repository root and notebooks/ on sys.path, then `import lecture`.
"""
import contextlib
import io
import json
import os

import matplotlib.pyplot as plt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


class Captured:
    """What a quiet() block printed: .text is all of it, .tail(n) its last n lines."""

    def __init__(self):
        self.buffer = io.StringIO()

    @property
    def text(self):
        return self.buffer.getvalue()

    def tail(self, n=1):
        return "\n".join(self.text.splitlines()[-n:])


@contextlib.contextmanager
def quiet():
    """Capture what the block prints (stdout) instead of showing it; yields the Captured text.

        with lecture.quiet() as log:
            history = sft.finetune(model, examples, 100, 1e-2, cfg, "cpu")
        print(log.tail(1))  # the last step's line, if wanted
    """
    captured = Captured()
    with contextlib.redirect_stdout(captured.buffer):
        yield captured


def running_mean(values, k=5):
    """Centred running mean: at each step, the mean of the k values around it (k // 2 before, the rest after; the
    windows at the ends are shorter), so the smooth curve does not lag the raw one it is drawn over."""
    before, after = k // 2, k - 1 - k // 2
    windows = [values[max(0, i - before):i + after + 1] for i in range(len(values))]
    return [sum(w) / len(w) for w in windows]


def window(n):
    """The default running-mean window for a curve of n steps: about a fifteenth of it, at least 2."""
    return max(2, round(n / 15))


def plot_curve(ax, steps, values, label=None, k=None, color=None):
    """values against steps on ax: the raw per-step curve faint (alpha 0.25) and its k-step running mean (default
    window(len(values))) on top, in one colour; only the running mean carries the label. Returns that line."""
    raw, = ax.plot(steps, values, alpha=0.25, linewidth=1, color=color)
    smooth, = ax.plot(steps, running_mean(list(values), k or window(len(values))), color=raw.get_color(),
                      label=label)
    return smooth


def plot_history(history, panels, title, k=None, ncols=3):
    """A run's per-step history (a list of dicts with "step"), one panel per unit. panels maps each panel's y label,
    unit included, to the keys drawn in it: a list, or a dict {key: legend label}, e.g.

        {"loss (nats)": ["loss"], "implicit reward (beta * nats)": {"chosen_reward": "chosen", ...}}

    A key that only some steps hold (held-out statistics) is drawn at those steps. The panels fill rows of ncols.
    Returns the figure."""
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (ylabel, keys) in zip(axes.flat, panels.items()):
        labels = keys if isinstance(keys, dict) else {key: key for key in keys}
        for key, label in labels.items():
            rows = [h for h in history if key in h]
            plot_curve(ax, [h["step"] for h in rows], [h[key] for h in rows], label=label, k=k)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(labels) > 1:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_best_of_n(curve, title):
    """reward.py's best-of-N curve (metrics["best_of_n"], one dict per N) in two panels, since the gold reward and
    the RM score are in different units: each against the analytic KL, each point labelled with its N. Returns the
    figure."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, ylabel, colour in [(axes[0], "gold_reward", "gold reward of the pick", "C1"),
                                    (axes[1], "rm_score", "RM score of the pick (reward-model units)", "C0")]:
        ax.plot([p["kl"] for p in curve], [p[key] for p in curve], "o-", color=colour)
        for p in curve:
            ax.annotate(f"N={p['n']}", (p["kl"], p[key]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set(xlabel="KL(best-of-N || SFT) = log N - (N-1)/N (nats)", ylabel=ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def load_metrics(stage, command):
    """The real run's out/<stage>/metrics.json as a dict; if it is missing, None, after one line that says which
    command (run from the repository root) writes it."""
    path = os.path.join(ROOT, "out", stage, "metrics.json")
    if not os.path.exists(path):
        print(f"out/{stage}/metrics.json not found: run `{command}` from the repository root, then run this cell "
              f"again")
        return None
    with open(path) as f:
        return json.load(f)
