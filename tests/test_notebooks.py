"""notebooks/*.ipynb: each is valid nbformat-4, stored executed (with its figures, under 1 MB, after the real lab
ran) with no step log and no temporary path in its outputs, is laid out as a lecture (what to run before it, what
you learned, exercises with hints), and runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) without
raising; notebooks/lecture.py, the helpers they share, against hand-made inputs. The kernel test is what keeps the
lecture notebooks in step with the code they import."""
import glob
import os
import re

import matplotlib
import nbformat
import pytest

matplotlib.use("Agg")  # no window
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import execute  # noqa: E402
import lecture  # noqa: E402
import stages  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
EXPECTED = ["01_pretraining", "02_sft", "03_reward_model", "04_ppo", "05_dpo", "06_frontier"]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def output_text(nb):
    """Everything the stored outputs show as text: streams, plain-text results, tracebacks."""
    parts = []
    for o in (o for c in code_cells(nb) for o in c.outputs):
        parts += [o.get("text", ""), o.get("data", {}).get("text/plain", ""), "\n".join(o.get("traceback", []))]
    return "\n".join(parts)


def test_the_six_notebooks_exist():
    assert [os.path.basename(p)[:-6] for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_executed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # nbformat's own schema: cell ids, output types, ...
    assert nb.nbformat == 4 and nb.nbformat_minor >= 5
    assert os.path.getsize(path) < 1_000_000, "store figures small enough to keep the file under 1 MB"
    cells = code_cells(nb)
    # executed once, top to bottom, by notebooks/experiments/execute.py: counts 1, 2, 3, ... and no error outputs
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "a lecture shows at least one figure"
    # stored after the real run: no cell says that a run's metrics.json is missing
    text = "".join(o.get("text", "") for o in outputs)
    assert "not found: run" not in text, "run the default chain before `python notebooks/experiments/execute.py`"
    for cell in cells:
        assert not re.search(r"^\s*[%!]", cell.source, re.M), "plain Python only: no magics or shell escapes"
    assert "sys.path.insert" in cells[0].source  # the repository root, wherever the kernel starts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_outputs_hold_no_step_log_and_no_temporary_path(path):
    # the training functions print one line per step (stages.log) and where they wrote; lecture.quiet() keeps both out
    text = output_text(nbformat.read(path, as_version=4))
    steps = re.findall(r"^step \d{5} \|.*$", text, re.M)
    assert not steps, f"{len(steps)} step-log lines in the stored outputs, the first: {steps[0]!r}"
    assert "/tmp/" not in text, "a temporary path in the stored outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_opens_with_what_to_run_and_closes_with_what_you_learned(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    sections = re.split(r"^## ", first.source, flags=re.M)
    assert len(sections) > 1 and sections[1].startswith("Before this lecture"), "first, what to run before it"
    assert re.search(r"python \S+\.py", sections[1]) and "minutes" in sections[1], "the command and how long it takes"
    headings = [c.source.split("\n")[0] for c in nb.cells if c.cell_type == "markdown"]
    assert headings[-2:] == ["## What you learned", "## Exercises"]
    learned = next(c.source for c in nb.cells if c.source.startswith("## What you learned"))
    assert len(re.findall(r"^- ", learned, re.M)) >= 2, "a few bullets"
    last_code = max(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert nb.cells[last_code + 1].source.startswith("## What you learned")
    # the shared helpers come from notebooks/lecture.py, never as a copy pasted into the notebook
    assert "import lecture" in code_cells(nb)[0].source
    assert not [c for c in code_cells(nb) if re.search(r"^def (plot_history|plot_curve|running_mean)\(", c.source, re.M)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_ends_with_exercises(path):
    nb = nbformat.read(path, as_version=4)
    headings = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(headings) == 1
    exercises = nb.cells[headings[0]].source
    n = len(re.findall(r"^\d+\. ", exercises, re.M))
    assert 2 <= n <= 4, f"two to four numbered exercises, found {n}"
    assert exercises.count("Hint") >= n, "each exercise has a hint"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_a_jupyter_kernel(path):
    nb = execute.execute(path, timeout=300)  # raises CellExecutionError, with the cell and its traceback
    assert all(c.execution_count for c in code_cells(nb))


def test_quiet_keeps_a_training_functions_step_log_and_hands_it_back(capsys):
    with lecture.quiet() as log:
        stages.log(12, loss=1.5, ms=3)
        print("the last line")
    assert capsys.readouterr().out == ""  # nothing reached the notebook
    assert log.text == "step 00012 | loss 1.5 | ms 3\nthe last line\n"
    assert log.tail(1) == "the last line" and log.tail(5) == log.text.rstrip("\n")


def test_running_mean_and_its_default_window():
    assert lecture.running_mean([1, 3, 5, 7], k=2) == [1, 2, 4, 6]  # the first window is shorter
    assert lecture.running_mean([1, 3, 5, 7, 9], k=3) == [2, 3, 5, 7, 8]  # centred: the windows around each step
    ramp = [float(i) for i in range(20)]
    assert lecture.running_mean(ramp, k=5)[2:-2] == ramp[2:-2]  # a straight line is not delayed: no lag
    assert lecture.running_mean([4.0]) == [4.0]
    assert [lecture.window(n) for n in (1, 24, 60, 1500)] == [2, 2, 4, 100]


def test_plot_curve_draws_the_raw_curve_faint_under_its_running_mean():
    fig, ax = plt.subplots()
    values = [5.0, 1.0, 3.0, 7.0]
    smooth = lecture.plot_curve(ax, [0, 1, 2, 3], values, label="loss", k=2)
    raw, line = ax.get_lines()
    assert line is smooth and list(raw.get_ydata()) == values and raw.get_alpha() == 0.25
    assert list(smooth.get_ydata()) == [5.0, 3.0, 2.0, 5.0] and smooth.get_alpha() is None
    assert raw.get_color() == smooth.get_color() and smooth.get_label() == "loss" and raw.get_label().startswith("_")
    plt.close(fig)


def test_plot_history_gives_each_unit_a_panel_of_its_own():
    history = [{"step": i, "loss": 1.0 / (i + 1), "accuracy": 0.5, "chosen": -0.1 * i, "rejected": -0.2 * i}
               for i in range(10)]
    for h in history[4::5]:
        h["val_accuracy"] = 0.75  # held-out statistics, on some steps only
    fig = lecture.plot_history(history, {"loss (nats)": ["loss"],
                                         "accuracy (fraction of pairs)": {"accuracy": "batch", "val_accuracy": "held out"},
                                         "implicit reward (nats)": ["chosen", "rejected"],
                                         "grad norm": ["loss"]},
                               "A hand-made run", ncols=3)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == ["loss (nats)", "accuracy (fraction of pairs)",
                                                "implicit reward (nats)", "grad norm"]
    assert len(fig.axes) == 6 and all(ax.get_xlabel() == "step" for ax in axes)  # 2 rows of 3, the last 2 hidden
    assert fig._suptitle.get_text() == "A hand-made run"
    accuracy = axes[1]
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["batch", "held out"]
    assert list(accuracy.get_lines()[2].get_xdata()) == [4, 9]  # drawn at the steps that hold it
    assert axes[0].get_legend() is None  # one curve: its axis label says what it is
    plt.close(fig)


def test_plot_best_of_n_puts_gold_and_rm_score_in_panels_labelled_with_n():
    curve = [{"n": n, "kl": kl, "gold_reward": g, "rm_score": r}
             for n, kl, g, r in [(1, 0.0, 1.0, 0.0), (2, 0.193, 1.4, 0.8), (4, 0.636, 1.6, 1.5)]]
    fig = lecture.plot_best_of_n(curve, "best-of-N")
    gold, rm = fig.axes
    assert list(gold.get_lines()[0].get_ydata()) == [1.0, 1.4, 1.6] and "gold" in gold.get_ylabel()
    assert list(rm.get_lines()[0].get_ydata()) == [0.0, 0.8, 1.5] and "RM score" in rm.get_ylabel()
    assert [t.get_text() for t in gold.texts] == ["N=1", "N=2", "N=4"] and "nats" in gold.get_xlabel()
    plt.close(fig)


def test_load_metrics_reads_a_run_or_says_which_command_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lecture, "ROOT", str(tmp_path))
    assert lecture.load_metrics("ppo", "python ppo.py") is None
    assert capsys.readouterr().out == ("out/ppo/metrics.json not found: run `python ppo.py` from the repository "
                                       "root, then run this cell again\n")
    (tmp_path / "out" / "ppo").mkdir(parents=True)
    (tmp_path / "out" / "ppo" / "metrics.json").write_text('{"kl": 1.5}')
    assert lecture.load_metrics("ppo", "python ppo.py") == {"kl": 1.5}
