"""
Every number the README shows, rendered from the runs, never typed. notebooks/experiments/seeds.py leaves one
results.json per preset (out/seeds/<preset>/results.json: each seed's final numbers of every stage); this script

  --update   merges them into notebooks/experiments/figures/seeds.json, the record shipped with the code (small: no
             histories); a seed run again replaces its row, and every row names the machine it ran on; it also keeps
             the default chain's reward model beside its rules (out/reward/metrics.json ->
             figures/reward_baselines.json)
  --time     times `python ppo.py` from nothing cached into notebooks/experiments/figures/chain_time.json
  (always)   renders from that record: the results table between the README's `results` markers, the full record
             notebooks/experiments/RESULTS.md (every seed, every stage, the timings and the checks judged on the
             worst seed) and the figure notebooks/experiments/figures/results.png (gold reward against KL, mean and
             range over seeds)

tests/test_results.py fails when the README's table or RESULTS.md differ from what this script renders from the
shipped record, so the front page cannot drift from the runs.

Run:  python notebooks/experiments/seeds.py && python notebooks/experiments/results.py --update
"""
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time

from checks import change_table, checks_line, checks_table, drop_share, gap, judged
from rm_levers import BEFORE_NOTE, BEFORE_TITLE, levers_section

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RECORD = os.path.join(HERE, "figures", "seeds.json")
README = os.path.join(ROOT, "README.md")
PAGE = os.path.join(HERE, "RESULTS.md")
FIGURE = os.path.join(HERE, "figures", "results.png")
PROCESSES = os.path.join(HERE, "figures", "processes.json")  # benchmark.py --processes=N writes it
CHAIN_TIME = os.path.join(HERE, "figures", "chain_time.json")  # results.py --time writes it
LEVERS = os.path.join(HERE, "figures", "rm_levers.json")  # rm_levers.py's results, copied by --update
# the levers measured on the chains before the reward model took graded labels and the twin curriculum: what
# decided that recipe (its `recipe` rows are the reward model before it)
LEVERS_BEFORE = os.path.join(HERE, "figures", "rm_levers_before.json")
FRONTIER = os.path.join(HERE, "figures", "frontier_results.json")  # notebooks/experiments/frontier.py's, shipped
BASELINES = os.path.join(HERE, "figures", "reward_baselines.json")  # the default chain's reward model and rules
RECIPE_BEFORE = os.path.join(HERE, "figures", "seeds_before.json")  # the small preset's seeds of earlier recipes
BEGIN, END = "<!-- results: rendered by notebooks/experiments/results.py -->", "<!-- /results -->"
TIME_BEGIN, TIME_END = "<!-- time: rendered by notebooks/experiments/results.py -->", "<!-- /time -->"
BON_N = 16  # the best-of-N row of the table

# (key of a seed's row, the method's name in the table)
METHODS = [("sft", "SFT"), ("best_of_n", f"best-of-{BON_N}"),
           ("rejection", "rejection sampling (best-of-8 as SFT data)"),
           ("ppo", "PPO"), ("dpo", "DPO"), ("oracle", "PPO on the gold human (oracle)")]


READOUTS = {"mean": ", read as its mean over the response", "last": ", read at the last token"}  # reward.Config.readout


def expected_kls(rows):
    """Do these seeds' rows hold the KL as an expectation (seeds.expectations), not the stage's one draw?"""
    return all("kl" in r.get("expected", {}).get("ppo", {}) for r in rows)


def method_settings(rows):
    """What the reward model, PPO and DPO ran with on these seeds, in words, from each row's settings
    (seeds.settings)."""
    def ppo_words(p):  # rows recorded before ppo.Config.kl_coef_floor had no floor
        if not p["adaptive_kl"]:
            return f"beta={p['kl_coef']:g}"
        floor = p.get("kl_coef_floor", 0.0)
        bound = (" and never below it" if floor == 1 else f", never below {floor:g} times that") if floor else ""
        return f"beta adapted towards a KL of {p['target_kl']:g} nats from {p['kl_coef']:g}{bound}"
    def dpo_words(d):
        return f"beta={d['beta']:g}, {d['steps']} steps on {'all the pairs' if d['twins'] else 'the sampled pairs'}"
    def reward_words(r):  # rows recorded before seeds.settings named the reward model, or its readout, say less
        if not r:
            return ""
        read = READOUTS.get(r.get("readout"), "")
        smoothed = f", labels smoothed by {r['label_smoothing']:g}" if r.get("label_smoothing") else ""
        return f"reward model {r['steps']} steps{read}{smoothed}, best-of-N on {r['bon_prompts']} prompts; "
    words = {f"{reward_words(r['settings'].get('reward'))}PPO {ppo_words(r['settings']['ppo'])}; "
             f"DPO {dpo_words(r['settings']['dpo'])}" for r in rows}
    return " / ".join(sorted(words))


def sentence(words):
    """words as the start of a sentence: the first letter upper case, the rest as written ("PPO" stays "PPO")."""
    return words[:1].upper() + words[1:]


def method_numbers(seed_row, key):
    """{gold_reward, follow_rate, kl, win_rate_vs_sft} of one method on one seed, None when it was not run. SFT is
    scored as PPO scores it: on the 256 held-out prompts, whose first reward.Config.bon_prompts samples are where
    best-of-N starts from. Where the seed has them (seeds.expectations: SFT, PPO, DPO), the follow rate, KL and win
    rate are the expectations over several samples a prompt that the checks judge, so each number has one source."""
    if key == "sft":
        p = seed_row["ppo"]
        numbers = dict(gold_reward=p["gold_reward_sft"], follow_rate=p["follow_rate_sft"], kl=0.0, win_rate_vs_sft=0.5)
    elif key == "best_of_n":
        numbers = next((b for b in seed_row["best_of_n"] if b["n"] == BON_N), None)
    else:
        numbers = seed_row.get(key)
    expected = seed_row.get("expected", {}).get(key, {})
    return None if numbers is None else {**numbers, **{m: expected[m] for m, _, _ in METRICS if m in expected}}


def spread(values):
    """(mean, min, max) of a list of numbers."""
    return sum(values) / len(values), min(values), max(values)


def number(x, spec):
    """x formatted with spec, with no "-0.00" (a KL of -0.001 is 0 at this precision)."""
    text = format(x, spec)
    return text.replace("-", "") if float(text) == 0 else text


def cell(values, spec):
    """'mean (min to max)' of values, formatted with spec; one value alone, or '-' for none."""
    if not values:
        return "-"
    mean, lo, hi = spread(values)
    if len(values) == 1:
        return number(mean, spec)
    return f"{number(mean, spec)} ({number(lo, spec)} to {number(hi, spec)})"


METRICS = [("gold_reward", "+.2f", "gold reward"), ("follow_rate", ".2f", "follow rate"), ("kl", ".2f", "KL (nats)"),
           ("win_rate_vs_sft", ".2f", "win rate vs SFT")]


def column(record, preset, key, metric):
    rows = record.get(preset, {}).get("seeds", [])
    numbers = [method_numbers(r, key) for r in rows]
    return [n[metric] for n in numbers if n is not None and n.get(metric) is not None]


def minutes(rows, stages):
    """Mean minutes over the seeds of the named stages' seconds, summed."""
    return sum(sum(r["seconds"].get(s, 0) for s in stages) for r in rows) / len(rows) / 60


CHAIN = ("pretrain", "sft", "pairs", "reward", "ppo")  # what `python ppo.py` builds from nothing
CLASS_MINUTES = 10  # the bound on `python ppo.py` from nothing, on the slowest 2-core machine a class may have


def cpu_model():
    """The CPU in words, from /proc/cpuinfo where there is one."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def time_chain():
    """`python ppo.py` from nothing cached (the tokenizer aside) in a temporary out_dir, timed as a whole process,
    with torch's default threads: {"seconds", "machine", "train_dtype", "stages", "recipe"}, put into CHAIN_TIME's
    list, one record a machine, the newest kept; a record of another recipe is dropped (recipe: the records of the
    SFT model and the reward model PPO started from, which name every stage's settings and dtype)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.time()
        run = subprocess.run([sys.executable, "ppo.py", f"--out_dir={out}"], cwd=ROOT, check=True, text=True,
                             stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        seconds = time.time() - t0
        with open(os.path.join(out, "ppo", "times.json")) as f:  # each stage's own time, as the run printed it
            times = json.load(f)
        with open(os.path.join(out, "ppo", "metrics.json")) as f:
            recipe = json.load(f)["built_from"]["parents"]
    print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("step ")))  # all but the steps
    record = {"seconds": round(seconds, 1), "machine": f"{cpu_model()}, {os.cpu_count()} cores, all threads",
              "train_dtype": times.get("train_dtype", "float32"),
              "stages": {k: round(v, 1) for k, v in times["seconds"].items()}, "recipe": recipe}
    others = [r for r in optional_record(CHAIN_TIME) or []
              if r["machine"] != record["machine"] and r.get("recipe") == recipe]
    with open(CHAIN_TIME, "w") as f:
        json.dump(others + [record], f, indent=1)
    return record


SHORT = {"rejection": "rejection sampling", "oracle": "PPO on the gold human"}  # the README's names, where shorter


def compact_cell(values, spec):
    """'mean [min, max]' of values formatted with spec, or the mean alone when every seed gives the same number."""
    mean, lo, hi = (number(x, spec) for x in spread(values))
    return mean if lo == hi else f"{mean} [{lo}, {hi}]"


def readme_table(record, processes=None, chain_time=None):
    """The README's table, read at a glance: each method on the small preset, mean [min, max] over its seeds, in
    five columns; then a line on the seeds and the machine, and one on the checks judged on the worst seed. The
    medium preset, the settings, the times and the provenance are RESULTS.md's (full_table)."""
    rows = record["small"]["seeds"]
    lines = ["| method | " + " | ".join(name for _, _, name in METRICS) + " |", "| --- |" + " ---: |" * len(METRICS)]
    for key, name in METHODS:
        if column(record, "small", key, "gold_reward"):
            cells = [compact_cell(column(record, "small", key, m), spec) for m, spec, _ in METRICS]
            lines.append(f"| {SHORT.get(key, name)} | {' | '.join(cells)} |")
    verdicts = judged(rows)
    short = [f"{what} {op} {bound:g}" for what, op, bound, _, _, ok in verdicts if not ok]
    samples = {r["expected"]["samples"] for r in rows if "expected" in r}
    lines += ["", textwrap.fill(
        f"Mean [min, max] over {len(rows)} seeds ({', '.join(str(r['seed']) for r in rows)}), each a whole chain "
        f"from pretraining on, on {machines(rows)}"
        + (f"; SFT's, PPO's and DPO's follow rates, KLs and win rates are expectations over {samples.pop()} samples "
           f"a prompt, the other methods' one sample a prompt" if len(samples) == 1 else "") + f". On the worst seed, {len(verdicts) - len(short)} of the "
        f"{len(verdicts)} checks of the claim hold" + (f"; short: {'; '.join(short)}" if short else "")
        + ". Every seed, the medium preset and how each was run: [RESULTS.md](notebooks/experiments/RESULTS.md).",
        120)]
    return "\n".join(lines)


# what each lecture asks to run first, and the stages that command builds from nothing
LECTURES = {"01_pretraining": (["python sft.py"], ("pretrain", "sft")),
            "02_sft": (["python sft.py"], ("pretrain", "sft")),
            "03_reward_model": (["python reward.py --stage=best_of_n"], ("pretrain", "sft", "pairs", "reward", "best_of_n")),
            "04_ppo": (["python ppo.py"], CHAIN),
            "05_dpo": (["python dpo.py"], ("pretrain", "sft", "pairs", "dpo")),
            "06_frontier": (["python ppo.py", "python dpo.py", "python reward.py --stage=rejection",
                             "python reward.py --stage=best_of_n"], CHAIN + ("dpo", "rejection", "best_of_n"))}


def lecture_time(record, name, frontier=None):
    """A lecture's line on what its first command took, from the seeds' records (each stage's seconds, mean over
    the small preset's seeds); 06's adds the frontier sweep's own time (frontier_results.json's seconds)."""
    commands, stages = LECTURES[name]
    rows = record["small"]["seeds"]
    line = (f"Measured: {', then '.join(f'`{c}`' for c in commands)} took {minutes(rows, stages):.1f} minutes from nothing, the mean over the "
            f"{len(rows)} seeds of [RESULTS.md](experiments/RESULTS.md) on {machines(rows)} while other runs shared "
            f"the cores (all threads on an idle machine is faster; the README gives `python ppo.py`'s time so).")
    if frontier and frontier.get("seconds"):
        line += (f" The sweep `python notebooks/experiments/frontier.py` took {frontier['seconds'] / 60:.0f} minutes "
                 f"on one such machine.")
    return textwrap.fill(line, 115)


def rendered_lecture(nb_path, record, frontier=None):
    """The notebook's JSON text with its first cell's time line rendered between the time markers."""
    with open(nb_path) as f:
        nb = json.load(f)
    name = os.path.basename(nb_path)[:-len(".ipynb")]
    first = nb["cells"][0]
    text = with_block("".join(first["source"]), lecture_time(record, name, frontier), TIME_BEGIN, TIME_END)
    first["source"] = text.splitlines(keepends=True)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"  # as nbformat.write stores it


def readme_time(chain_time):
    """The README's line beside the commands: how long `python ppo.py` takes from nothing, slowest machine first."""
    if not chain_time:
        return "`python ppo.py` has not been timed from nothing yet (`python notebooks/experiments/results.py --time`)."
    runs = sorted(chain_time, key=lambda r: -r["seconds"])
    took = "; ".join(f"{r['seconds'] / 60:.1f} minutes on {r['machine'].split(',')[0]}, its supervised steps in "
                     f"{r.get('train_dtype', 'float32')}" for r in runs)
    bound = "within" if runs[0]["seconds"] <= 60 * CLASS_MINUTES else "over"
    return textwrap.fill(f"From nothing, `python ppo.py` takes {took} (2 cores, all threads, nothing else running; "
                         f"the slowest machine measured first): {bound} the {CLASS_MINUTES} minutes a class has on "
                         f"the slowest machine.", 120)


def full_table(record, processes=None, chain_time=None):
    """RESULTS.md's first table: each method on both presets (mean and range over its seeds), a line on each
    preset's seeds, settings, machine and time, the checks, the chain's time from nothing; with processes
    (notebooks/experiments/benchmark.py --processes's record), a line on N processes against one."""
    presets = [p for p in ("small", "medium") if record.get(p, {}).get("seeds")]
    head = [f"{name}{', ' + p if len(presets) > 1 else ''}" for p in presets for _, _, name in METRICS]
    lines = [f"| method | {' | '.join(head)} |", "| --- |" + " ---: |" * len(head)]
    for key, name in METHODS:
        cells = [cell(column(record, p, key, m), spec) for p in presets for m, spec, _ in METRICS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append("")
    for p in ("small", "medium"):
        rows = record.get(p, {}).get("seeds", [])
        if not rows:
            lines.append(f"The {p} preset has no seed in this record yet: `python notebooks/experiments/seeds.py --preset={p}` "
                         f"adds its columns.")
            continue
        others = [(key, name) for key, name in (("best_of_n", "best-of-N"), ("dpo", "DPO"), ("rejection",
                  "rejection sampling"), ("oracle", "PPO on the gold human")) if all(key in r["seconds"] for r in rows)]
        missing = [name for key, name in METHODS if not column(record, p, key, "gold_reward")]
        groups = by_machine(rows)
        took = "; ".join(f"{minutes(rs, CHAIN):.1f} minutes a seed{' on ' + m.split(',')[0] if len(groups) > 1 else ''}"
                         + "".join(f", {name} {minutes(rs, [key]):.1f}" for key, name in others) for m, rs in groups)
        lines.append(f"{p}: {'mean (worst to best) over ' if len(rows) > 1 else ''}{len(rows)} "
                     f"seed{'s' * (len(rows) != 1)} ({', '.join(str(r['seed']) for r in rows)}), "
                     f"{'each ' if len(rows) > 1 else ''}a chain of its own, {method_settings(rows)}, on "
                     f"{machines(rows)}; the chain "
                     f"`python ppo.py` builds took {took}, on one thread while other runs shared the cores"
                     + (f" ({', '.join(missing)}: not run on this preset)." if missing else "."))
    if record.get("small", {}).get("seeds"):
        lines.append(checks_line(record["small"]["seeds"]))
    if chain_time:
        took = "; ".join(f"{r['seconds'] / 60:.1f} minutes on {r['machine']}, supervised steps in "
                         f"{r.get('train_dtype', 'float32')}" + (" (" + ", ".join(
                             f"{k} {v / 60:.1f}" for k, v in r["stages"].items()) + ")" if r.get("stages") else "")
                         for r in chain_time)
        lines.append(f"`python ppo.py` from a fresh start took {took}; nothing else running "
                     f"(`python notebooks/experiments/results.py --time`).")
    if processes:
        lines.append(f"{processes['processes']} CPU processes under torchrun pretrain the medium preset's "
                     f"{processes['params']}-parameter model {processes['speedup']:.2f} times as fast as one process "
                     f"(`python notebooks/experiments/benchmark.py --processes={processes['processes']}`, {processes['machine']}, "
                     f"load average {processes['load']} while it ran).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the full record

def baselines_record(out_dir):
    """From the default chain's out/reward/metrics.json: the reward model, the rules that read no weights and the
    labels' ceiling on the same held-out pairs, with the seed and the machine; None before it has the rules."""
    path = os.path.join(out_dir, "reward", "metrics.json")
    metrics = optional_record(path) or {}
    if "baselines" not in metrics:
        return None
    keep = ("heldout_accuracy", "heldout_accuracy_expected", "label_ceiling", "label_ceiling_expected", "baselines")
    return {"seed": metrics["config"]["seed"], "pairs": metrics["config"]["n_eval_pairs"],
            "machine": f"{cpu_model()}, {os.cpu_count()} cores", **{k: metrics[k] for k in keep}}


def baselines_section(rows, default):
    """RESULTS.md's table of the reward model beside the rules that read no weights (stages.RULES): over the seeds
    that recorded them, else on the default chain's held-out pairs (BASELINES)."""
    have = [r["reward"] for r in rows if "baselines" in r["reward"]]
    if have:
        where = f"mean (worst to best) over the {len(have)} seeds that recorded them"
    elif default:
        have, where = [default], (f"on the default chain only (seed {default['seed']}, {default['machine']}): the "
                                  "seeds' rows above predate the rules and gain them when seeds.py runs again")
    else:
        return []
    rules = list(have[0]["baselines"])
    lines = ["### The reward model beside rules that read no weights", "",
             f"On the same {have[0].get('pairs', 512)} held-out pairs, {where}. A rule scores a response without "
             "weights (`stages.RULES`: its word count; how many of the request's own words it repeats); a tie counts "
             "half. Agreement with one draw of the labels, and expected over the labeller's coin.", "",
             "| scorer | agreement with the labels | expected |", "| --- | ---: | ---: |"]
    scorers = [(f"rule: {k}", lambda m, k=k: m["baselines"][k]["accuracy"],
                lambda m, k=k: m["baselines"][k]["expected"]) for k in rules]
    scorers += [("the reward model", lambda m: m["heldout_accuracy"], lambda m: m["heldout_accuracy_expected"]),
                ("the labels' ceiling", lambda m: m["label_ceiling"], lambda m: m["label_ceiling_expected"])]
    for name, one, expected in scorers:
        lines.append(f"| {name} | {cell([one(m) for m in have], '.3f')} | {cell([expected(m) for m in have], '.3f')} |")
    return lines + [""]


def per_seed_table(rows, columns):
    """A markdown table, one line per seed and, for several seeds, a mean/min/max footer. columns: (header,
    function of a row, spec)."""
    lines = [f"| seed | {' | '.join(h for h, _, _ in columns)} |", "| ---: |" + " ---: |" * len(columns)]
    values = [[f(r) for _, f, _ in columns] for r in rows]
    for r, v in zip(rows, values):
        lines.append(f"| {r['seed']} | {' | '.join('-' if x is None else number(x, s) for x, (_, _, s) in zip(v, columns))} |")
    footer = (("mean", lambda xs: sum(xs) / len(xs)), ("min", min), ("max", max)) if len(rows) > 1 else ()
    for name, agg in footer:
        cells = []
        for i, (_, _, s) in enumerate(columns):
            xs = [v[i] for v in values if v[i] is not None]
            cells.append(number(agg(xs), s) if xs else "-")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def change_section(before, record):
    """RESULTS.md's section on the recipes before today's (RECIPE_BEFORE: a list of {"recipe", "small"}, and "name"
    on one that others were measured against, "after" on those): the checks on each one's seeds, next to today's, or
    to the named recipe it led to, on the same seeds."""
    rows = record["small"]["seeds"]
    out = ["## How the recipe came to be, seed by seed", "",
           "The checks above on the small preset's chains of earlier recipes (`notebooks/experiments/figures/seeds_before.json`) "
           f"and on today's ({method_settings(rows)}), seed by seed: each seed is a whole chain of its own each "
           "time, so a seed's two numbers differ by the change and by the chain's chaos, and the worst seed is what "
           "a claim is judged on.", ""]
    def samples(seeds):
        return "/".join(map(str, sorted({r["expected"]["samples"] for r in seeds if "expected" in r})))

    for earlier in before:
        # an entry measured against a recipe that has changed since names that recipe's entry ("after")
        then, after = earlier["small"]["seeds"], {"name": "today's", "seeds": rows}
        if earlier.get("after"):
            named = next(e for e in before if e.get("name") == earlier["after"])
            after = {"name": named["name"], "seeds": named["small"]["seeds"]}
        when = "after it" if earlier.get("after") else "today"
        noted = "" if samples(then) == samples(after["seeds"]) else (
            f" Follow and win rates are expectations over {samples(then)} samples a prompt there and "
            f"{samples(after['seeds'])} {when} (`notebooks/experiments/seeds.py --samples`)"
            + (f"; KLs one draw there and over {samples(after['seeds'])} {when}."
               if expected_kls(after["seeds"]) and not expected_kls(then) else "."))
        where = machines(then) if machines(then) == machines(after["seeds"]) else (
            f"{machines(then)}, and after it on {machines(after['seeds'])}")
        out += [f"### {earlier['recipe']} -> {after['name']}", "", f"On {where}.{noted}", "",
                change_table(then, after["seeds"]), ""]
    return "\n".join(out)


def method_columns(key):
    get = lambda m: (lambda r: (r.get(key) or {}).get(m))  # noqa: E731
    return [("gold", get("gold_reward"), "+.3f"), ("gold of SFT", get("gold_reward_sft"), "+.3f"),
            ("follow", get("follow_rate"), ".3f"), ("follow of SFT", get("follow_rate_sft"), ".3f"),
            ("KL (nats)", get("kl"), ".3f"), ("win rate vs SFT", get("win_rate_vs_sft"), ".3f")]


def results_page(record, levers=None, before=None, recipe_before=None, processes=None, chain_time=None):
    """notebooks/experiments/RESULTS.md: the full record behind the README's table; with levers (notebooks/experiments/rm_levers.py's
    results), before (the levers on the chains before the recipe changed) and recipe_before (the seeds of earlier
    recipes, RECIPE_BEFORE), a section on each."""
    out = ["# Results, rendered from the runs", "",
           "Rendered by `python notebooks/experiments/results.py` from `notebooks/experiments/figures/seeds.json`, which "
           "`python notebooks/experiments/seeds.py` writes (each seed a whole chain of its own: pretraining, SFT, pairs, reward "
           "model, best-of-N, rejection sampling, PPO, PPO on the gold human, DPO). Do not edit by hand: "
           "`tests/test_results.py` fails when this page differs from what the script renders.", "",
           "## Every method on both presets", "",
           "Each cell is the mean (worst to best) over a preset's seeds; the README shows the small preset's.", "",
           full_table(record, processes, chain_time), ""]
    for preset in ("small", "medium"):
        if preset not in record:
            continue
        rows = record[preset]["seeds"]
        out += [f"## The `{preset}` preset: {len(rows)} seed{'s' if len(rows) != 1 else ''}", "",
                f"Machine{'s' * (len(by_machine(rows)) > 1)}: {machines(rows)}. {sentence(method_settings(rows))}.", ""]
        out += ["### Stages 1-2: pretraining and SFT", "", per_seed_table(rows, [
            ("pretraining val loss (nats/token)", lambda r: r["pretrain"]["val_loss"], ".4f"),
            ("pretrained follow rate (128 prompts)", lambda r: r["sft"]["pretrained_follow_rate"], ".3f"),
            ("SFT follow rate (128 prompts)", lambda r: r["sft"]["follow_rate"], ".3f"),
            ("SFT gold (128 prompts)", lambda r: r["sft"]["gold_reward"], "+.3f"),
            ("SFT follow rate (256 prompts)", lambda r: r["ppo"]["follow_rate_sft"], ".3f")]), ""]
        out += ["### Stage 3a: the reward model", "",
                "Expected accuracies average over the labeller's coin (`stages.expected_accuracy`); the gap is the "
                "labels' ceiling minus the reward model, in points; the prompt-swap drop is how much the reward "
                "model's agreement with gold falls when a pair is scored under another request, next to the gold "
                "human's own drop (`stages.prompt_swap`).", "", per_seed_table(rows, [
                    ("expected accuracy", lambda r: r["reward"]["heldout_accuracy_expected"], ".3f"),
                    ("ceiling", lambda r: r["reward"]["label_ceiling_expected"], ".3f"),
                    ("gap (points)", lambda r: gap(r["reward"]), ".1f"),
                    ("accuracy on 512 training pairs", lambda r: r["reward"]["train_accuracy"], ".3f"),
                    ("held-out accuracy", lambda r: r["reward"]["heldout_accuracy"], ".3f"),
                    ("prompt-swap drop", lambda r: r["reward"]["prompt_swap"]["drop"], ".3f"),
                    ("gold human's drop", lambda r: r["reward"]["prompt_swap"]["gold_drop"], ".3f"),
                    ("drop / gold's", lambda r: drop_share(r["reward"]), ".2f")]), ""]
        out += baselines_section(rows, optional_record(BASELINES) if preset == "small" else None)
        ns = [b["n"] for b in rows[0]["best_of_n"]]
        out += ["### Best-of-N on the held-out prompts (sample 1 is the SFT sample)", "",
                "| N | KL bound (nats) | gold | follow | win rate vs SFT |", "| ---: | ---: | ---: | ---: | ---: |"]
        for i, n in enumerate(ns):
            pts = [r["best_of_n"][i] for r in rows]
            out.append(f"| {n} | {pts[0]['kl']:.3f} | {cell([p['gold_reward'] for p in pts], '+.3f')} | "
                       f"{cell([p['follow_rate'] for p in pts], '.3f')} | "
                       f"{cell([p.get('win_rate_vs_sft') for p in pts if p.get('win_rate_vs_sft') is not None], '.3f')} |")
        out.append("")
        for key, name in METHODS[2:]:
            if any(r.get(key) for r in rows):
                out += [f"### {name}", "", per_seed_table(rows, method_columns(key)), ""]
        stages = list(dict.fromkeys(s for r in rows for s in r["seconds"]))
        where = "each seed's machine above" if len(by_machine(rows)) > 1 else "the machine above"
        out += [f"### Time per stage (seconds, on {where})", "",
                per_seed_table(rows, [(s, (lambda s: lambda r: r["seconds"].get(s))(s), ".0f") for s in stages]), ""]
        out += ["### The InstructGPT claim, judged on the worst seed", "", checks_table(rows), ""]
        n = [r["expected"]["samples"] for r in rows if "expected" in r]
        if n:
            what = ("Follow rates, win rates and KLs" if expected_kls([r for r in rows if "expected" in r])
                    else "Follow and win rates")
            out += [f"{what} here are expectations over {n[0]} samples a held-out prompt from each "
                    f"model (`notebooks/experiments/seeds.py --samples`), on {len(n)} of the {len(rows)} seeds"
                    + ("" if len(n) == len(rows) else "; on the others, each stage's one draw") + ".", ""]
    if recipe_before:
        out.append(change_section(recipe_before, record))
    if levers:
        out.append(levers_section(levers))
    if before:
        out.append(levers_section(before, BEFORE_TITLE, BEFORE_NOTE))
    return "\n".join(out)


# ----------------------------------------------------------------------------- the figure

def plot_results(record, ax, preset="small"):
    """Gold reward against KL(pi || pi_sft) on a matplotlib Axes: each method's mean over seeds with its range as
    error bars, best-of-N as a curve through N = 1, 2, 4, ... (its KL the analytic bound), each point labelled."""
    rows = record[preset]["seeds"]
    ns = [b["n"] for b in rows[0]["best_of_n"]]
    bon = [spread([r["best_of_n"][i][k] for r in rows]) for i in range(len(ns)) for k in ("kl", "gold_reward")]
    kls, golds = [m for m, _, _ in bon[0::2]], [m for m, _, _ in bon[1::2]]
    ax.plot(kls, golds, marker=".", color="grey", label="best-of-N (RM picks)")
    for n, k, g in zip(ns, kls, golds):
        ax.annotate(f"N={n}", (k, g), textcoords="offset points", xytext=(3, -10), fontsize=8, color="grey")
    ppo_run, dpo_run = rows[0]["settings"]["ppo"], rows[0]["settings"]["dpo"]
    adaptive = ppo_run["adaptive_kl"] and ppo_run.get("kl_coef_floor", 0) == 1  # beta starts at its floor
    setting = {"ppo": f"beta={ppo_run['kl_coef']:g}" + (f", raised above a KL of {ppo_run['target_kl']:g}" if adaptive
                                                         else " (adaptive)" if ppo_run["adaptive_kl"] else ""),
               "dpo": f"beta={dpo_run['beta']:g}"}  # the legend names each method's setting
    for key, name in METHODS:
        if key == "best_of_n" or not column(record, preset, key, "kl"):
            continue
        (k, klo, khi), (g, glo, ghi) = (spread(column(record, preset, key, m)) for m in ("kl", "gold_reward"))
        ax.errorbar([k], [g], xerr=[[k - klo], [khi - k]], yerr=[[g - glo], [ghi - g]], fmt="o", capsize=3,
                    label=f"{name}, {setting[key]}" if key in setting else name)
    ax.set(xlabel="KL(pi || pi_sft) on its own samples (nats)", ylabel="gold reward, held-out prompts",
           title=f"Gold reward against KL to SFT ({preset} preset, {len(rows)} seeds: mean and range)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def write_figure(record, path=FIGURE):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    plot_results(record, ax)
    fig.savefig(path + ".tmp.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ----------------------------------------------------------------------------- main

def with_block(readme, text, begin=BEGIN, end=END):
    """README text with a rendered block between its markers (a ValueError when the markers are missing)."""
    if begin not in readme or end not in readme:
        raise ValueError(f"{README}: no {begin} ... {end} markers to put the rendered text between")
    head, rest = readme.split(begin, 1)
    return f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}"


def rendered_readme(readme, record):
    """The README with its two rendered blocks, the time beside the commands and the results table, as they stand."""
    chain_time = optional_record(CHAIN_TIME)
    readme = with_block(readme, readme_time(chain_time), TIME_BEGIN, TIME_END)
    return with_block(readme, readme_table(record, optional_record(PROCESSES), chain_time))


def collect(out_dir):
    """{preset: results} from out_dir/seeds/<preset>/results.json."""
    record = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "seeds", "*", "results.json"))):
        with open(path) as f:
            results = json.load(f)
        record[results["preset"]] = results
    return record


def merge(shipped, new):
    """The shipped record with new runs merged in: a new seed's row replaces the shipped row of that seed, other
    shipped rows stay, so seeds run at different times (or on different machines) add up to one record. Every row
    names its machine (a results.json names it once, for all of its seeds)."""
    record = {}
    for preset in dict.fromkeys([*shipped, *new]):
        rows = {}
        for results in (shipped.get(preset), new.get(preset)):
            for r in (results or {}).get("seeds", []):
                rows[r["seed"]] = {**r, "machine": r.get("machine", results.get("machine"))}
        record[preset] = {"preset": preset, "seeds": list(rows.values())}
    return record


def by_machine(rows):
    """[(machine, its seeds' rows)] in the rows' order: a time is only comparable on one machine."""
    groups = {}
    for r in rows:
        groups.setdefault(r["machine"], []).append(r)
    return list(groups.items())


def machines(rows):
    """The machines of the rows in words, each with its seeds when there are several machines."""
    groups = by_machine(rows)
    if len(groups) == 1:
        return groups[0][0]
    return "; ".join(f"{m} (seed{'s' * (len(rs) > 1)} {', '.join(str(r['seed']) for r in rs)})" for m, rs in groups)


def optional_record(path):
    """A record another command writes (CHAIN_TIME, PROCESSES), or None before it has run."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main():
    args = sys.argv[1:]
    if args not in ([], ["--update"], ["--time"]):
        sys.exit("usage: python notebooks/experiments/results.py [--update | --time]   (--update: copy out/seeds/*/results.json "
                 "first; --time: time python ppo.py from nothing first)")
    if args == ["--time"]:
        print(f"python ppo.py: {time_chain()['seconds']:.0f} s")
    if args == ["--update"]:
        new, baselines = collect(os.path.join(ROOT, "out")), baselines_record(os.path.join(ROOT, "out"))
        if not new and not baselines:
            sys.exit("error: no out/seeds/<preset>/results.json nor out/reward/metrics.json with the rules; run "
                     "python notebooks/experiments/seeds.py or python reward.py first")
        if new:
            with open(RECORD) as f:
                record = merge(json.load(f), new)
            with open(RECORD, "w") as f:
                json.dump(record, f, indent=1)
        if baselines:
            with open(BASELINES, "w") as f:
                json.dump(baselines, f, indent=1)
        levers = optional_record(os.path.join(ROOT, "out", "rm_levers", "results.json"))
        if levers:
            with open(LEVERS, "w") as f:
                json.dump(levers, f, indent=1)
    with open(RECORD) as f:
        record = json.load(f)
    with open(README) as f:
        readme = f.read()
    with open(README, "w") as f:
        f.write(rendered_readme(readme, record))
    frontier = optional_record(FRONTIER)
    for name in LECTURES:
        path = os.path.join(os.path.dirname(HERE), f"{name}.ipynb")
        text = rendered_lecture(path, record, frontier)
        with open(path, "w") as f:
            f.write(text)
    with open(PAGE, "w") as f:
        f.write(results_page(record, optional_record(LEVERS), optional_record(LEVERS_BEFORE),
                             optional_record(RECIPE_BEFORE), optional_record(PROCESSES), optional_record(CHAIN_TIME)))
    write_figure(record)
    print(f"rendered {README}, {PAGE} and {FIGURE} from {RECORD}")


if __name__ == "__main__":
    main()
