"""
The plumbing every script shares, so that the stage modules hold the science: files written atomically and read
with one-line errors, the device, data parallelism under torchrun, the `--field=value` command line built from a
Config, and the one-line errors of main(). No equation of the pipeline is here: a reader may skip this file.
"""
import contextlib
import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """A temporary file next to path, renamed into place when the block ends and deleted if anything (Ctrl-C too)
    stops it first: path is always the old file or the new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C inside the block takes effect when it ends: the files it writes land together or not at all."""
    caught, main_thread = [], True
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # only the main thread may set a handler; elsewhere there is nothing to defer
        main_thread = False
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or is not one of ours (model.load_checkpoint)."""


def read_text(path):
    """A UTF-8 file's text; a missing file or bytes that are not UTF-8 are one line naming the file (and line)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def load_jsonl(path, keys, numbers=()):
    """JSONL records: objects with string values for keys (and numbers >= 0 for numbers); errors name the line."""
    records = []
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        for k in keys:
            if k not in rec:
                raise ValueError(f"{path}:{lineno}: missing key {k!r} (each line needs {', '.join(keys)})")
            if not isinstance(rec[k], str):
                raise ValueError(f"{path}:{lineno}: {k!r} must be a string, got {type(rec[k]).__name__}")
        for k in numbers:
            v = rec.get(k, 0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"{path}:{lineno}: {k!r} must be a number >= 0, got {v!r}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def save_jsonl(path, records):
    with atomic_write(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- device and autocast

def pick_device(name="auto"):
    """auto: CUDA, then Apple's GPU (MPS), then the CPU. Under torchrun "cuda" is this process's LOCAL_RANK GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


# autocast's dtype per device type: bf16 on CUDA, fp32 on CPU and MPS (bf16 matmuls are slow on most CPUs); AdamW's
# fused kernel on CUDA. tests/test_cuda_path.py turns both on for the CPU, to test the CUDA path's numerics.
AUTOCAST = {"cuda": torch.bfloat16, "cpu": None, "mps": None}
FUSED = {"cuda": True, "cpu": False, "mps": False}


def autocast(device):
    dtype = AUTOCAST.get(torch.device(device).type)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def nvidia_gpu_visible():  # is an NVIDIA GPU here (its driver's files), whether or not this torch can use it?
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def announce(cfg):
    """Every script's first line: device, dtype, preset; and a warning when an NVIDIA GPU is visible but this torch
    (the CPU build) cannot use it, instead of a quiet run on the CPU."""
    device = pick_device(cfg.device)
    dtype = str(AUTOCAST.get(torch.device(device).type) or torch.float32).replace("torch.", "")
    n = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    print(f"device {device} | dtype {dtype} | preset {cfg.preset} | torch {torch.__version__}"
          + (f" | processes {n}" if n > 1 else ""))
    if nvidia_gpu_visible() and not torch.cuda.is_available():
        print(f"warning: an NVIDIA GPU is visible but torch {torch.__version__} cannot use it; for the CUDA build: "
              f"pip install --force-reinstall torch=={torch.__version__.split('+')[0]}", file=sys.stderr)


def to_device(t, device):
    """Host -> device copy of a batch; on CUDA pinned and asynchronous, so it overlaps compute."""
    if str(device).startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ----------------------------------------------------------------------------- data parallelism under torchrun
# `torchrun --nproc_per_node=N script.py` starts N copies of a script, each told its RANK, LOCAL_RANK (its GPU) and
# WORLD_SIZE. Each process takes an equal share of every global batch (my_share), the gradients are averaged
# (average_gradients, in training.optimizer_step), so the weights stay equal, and rank 0 alone evaluates
# (on_rank_0), prints and writes. Without torchrun every helper returns its input or does nothing.

_alone = False  # True while rank 0 runs an on_rank_0 function by itself: in there it is one process on its own


def distributed():
    """Is this process one of several that torchrun started (and not inside an on_rank_0 function)?"""
    return dist.is_available() and dist.is_initialized() and not _alone


def rank():
    """This process's number: 0 without torchrun; torchrun's RANK, also before the process group exists."""
    return dist.get_rank() if distributed() else int(os.environ.get("RANK", 0))


def world_size():
    return dist.get_world_size() if distributed() else 1


@contextlib.contextmanager
def data_parallel(cfg, batch_field, multiple=1):
    """main()'s second wrapper, under torchrun: --batch_field must split into WORLD_SIZE equal shares, each a multiple
    of `multiple`; then the process group (NCCL on CUDA, gloo elsewhere), and stdout for rank 0 alone."""
    n = int(os.environ.get("WORLD_SIZE", 1))
    if n == 1:
        yield
        return
    size = getattr(cfg, batch_field)
    if size % (n * multiple):
        whole = f", a multiple of {multiple}" if multiple > 1 else ""
        raise stop(f"error: --{batch_field}={size}: must be a multiple of {n * multiple}, so that each of the {n} "
                   f"processes torchrun started takes an equal share{whole}")
    device = pick_device(cfg.device)
    cuda = device.startswith("cuda")
    joins = not dist.is_initialized()  # a caller may have joined already (tests/torchrun_driver.py does)
    if joins:
        if cuda:
            torch.cuda.set_device(device)
        # rank 0 evaluates alone while the others wait for its numbers: a long wait, not a hang
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=torch.device(device) if cuda else None)
    if rank() > 0:
        sys.stdout = open(os.devnull, "w")
    yield
    if joins:
        dist.destroy_process_group()


class ProcessLost(RuntimeError):
    """A collective failed: another process has died (and said why). main() ends this one quietly."""


def _collective(op, *args, **kwargs):
    try:
        return op(*args, **kwargs)
    except RuntimeError as e:
        raise ProcessLost(str(e).splitlines()[0]) from None


def _flat_collective(tensors, op, *args):
    """op (an all-reduce, a broadcast) on all of tensors at once, as one flat buffer where the backend wants it."""
    where = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flat = torch.cat([t.detach().flatten() for t in tensors]).to(where)
    _collective(op, flat, *args)
    with torch.no_grad():
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def all_reduce_sum(tensor):
    """The sum of tensor over all processes (a new tensor); tensor itself without a process group."""
    if not distributed():
        return tensor
    total = tensor.clone()
    _flat_collective([total], dist.all_reduce)
    return total


def mean_over_processes(numbers):
    """{name: float} -> the mean of each over the processes, so a logged number means the whole global batch."""
    if not distributed():
        return numbers
    total = all_reduce_sum(torch.tensor(list(numbers.values()), dtype=torch.float64))
    return dict(zip(numbers, (total / world_size()).tolist()))


def average_gradients(model):
    """The mean of the processes' gradients, as DistributedDataParallel computes it."""
    if distributed():
        grads = [p.grad for p in model.parameters() if p.grad is not None]  # the same parameters in every process
        _flat_collective(grads, dist.all_reduce)
        for g in grads:
            g.div_(world_size())


def same_start(model):
    """Every process takes rank 0's weights; with the same averaged gradients they then stay equal."""
    if distributed():
        _flat_collective(list(model.parameters()), dist.broadcast, 0)


def my_share(batch):
    """This process's rows of a global batch (every process draws the same one): rank r of N takes the r-th part."""
    if not distributed():
        return batch
    n = world_size()
    if len(batch) % n:  # data_parallel checks the run's own batch; this, a stage the chain builds on the way
        raise ValueError(f"a batch of {len(batch)} does not split into {n} equal shares; build that stage first, "
                         f"with a batch size that is a multiple of {n}")
    k = len(batch) // n
    return batch[rank() * k:(rank() + 1) * k]


def barrier():
    """Wait until every process is here (after rank 0 has written what the others read next)."""
    if distributed():
        _collective(dist.barrier)


def on_rank_0(fn):
    """A decorator: fn computed by rank 0 alone (distributed() is False inside), its result sent to every process."""
    @functools.wraps(fn)
    def computed_by_rank_0(*args, **kwargs):
        global _alone
        if not distributed():
            return fn(*args, **kwargs)
        result = [None]
        if rank() == 0:
            _alone = True
            try:
                result[0] = fn(*args, **kwargs)
            finally:
                _alone = False
        _collective(dist.broadcast_object_list, result, src=0)
        return result[0]
    return computed_by_rank_0


# ----------------------------------------------------------------------------- the command line

def stop(message):
    """The SystemExit of a mistake all processes meet alike: rank 0 prints its line, the others exit 0 quietly."""
    return SystemExit(message if rank() == 0 else 0)


def flag_type(name, default):
    """The converter of a field's flag to its default's type (true/false, yes/no, 1/0 for a bool), in one line."""
    kind = type(default)
    words = {int: "an integer", float: "a number", bool: "true or false"}

    def convert(text):
        try:
            if kind is bool and text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes") if kind is bool else kind(text)
        except ValueError:
            raise stop(f"error: --{name}={text}: must be {words[kind]}") from None
    return convert


def parse_flags(fields, argv):
    """{field: value} of `--field=value` / `--field value` flags, each converted by flag_type; the last one wins."""
    types, overrides, i = {f.name: flag_type(f.name, f.default) for f in fields}, {}, 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise stop(f"error: unexpected argument {argv[i]!r}; flags look like --field=value")
        name, has_value, text = argv[i][2:].partition("=")
        if name not in types:
            raise stop(f"error: unknown flag --{name}; valid flags: " + ", ".join(f"--{n}" for n in types))
        if not has_value:
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise stop(f"error: --{name} needs a value")
            i, text = i + 1, argv[i + 1]
        overrides[name] = types[name](text)
        i += 1
    return overrides


def resolve_preset(preset):
    """--preset=auto is "medium" where CUDA is available, else "small"; any other name is itself."""
    return ("medium" if torch.cuda.is_available() else "small") if preset == "auto" else preset


def parse_config(cls, argv=None, presets=None, check=None, quiet=False):
    """A Config from flags, over a preset's overrides (`presets`: name -> fields); `--help` prints the Config. The
    first of check(cfg)'s (field, ok, allowed) rows that fails ends the program in one line, before any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = quiet or rank() > 0
    fields = dataclasses.fields(cls)
    if "-h" in argv or "--help" in argv:  # the help is the Config's source, with the fields it inherits
        source = "\n".join(inspect.getsource(c) for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c))
        print(f"usage: python {os.path.basename(sys.argv[0])} [--field=value ...], the fields of\n\n{source}"
              + (f"\npresets (--preset=auto: medium on CUDA): {presets}" if presets else ""))
        raise SystemExit(0)
    overrides = parse_flags(fields, argv)
    cfg = cls()
    if presets and hasattr(cfg, "preset"):
        preset = resolve_preset(overrides.get("preset", cfg.preset))
        if preset not in presets:
            raise stop(f"error: --preset={preset}: must be one of auto, {', '.join(presets)}")
        cfg = dataclasses.replace(cfg, **presets[preset], preset=preset)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k != "preset"})
    for field, ok, allowed in check(cfg) if check else ():
        if not ok:
            raise stop(f"error: --{field}={getattr(cfg, field)}: must be {allowed}")
    if not quiet and hasattr(cfg, "device"):
        announce(cfg)
    for key, value in {} if quiet else overrides.items():
        print(f"override: {key} = {value!r}")
    return cfg


# ----------------------------------------------------------------------------- errors main() reports in one line

class Diverged(RuntimeError):
    """A loss or reward became nan or inf: the stage stops, and writes nothing from the diverged model."""


def check_finite(step, **values):
    """Raise Diverged ("step 12: loss is nan") on a nan or inf; under torchrun all processes stop together, or none."""
    first_bad = {}
    for name, value in values.items():
        value = torch.as_tensor(value).detach()
        bad = value[~torch.isfinite(value)]
        first_bad[name] = bad.flatten()[0].item() if len(bad) else 0.0
    if distributed():
        total = all_reduce_sum(torch.tensor(list(first_bad.values()), dtype=torch.float64))
        first_bad = dict(zip(first_bad, total.tolist()))
    for name, value in first_bad.items():
        if not math.isfinite(value):
            raise Diverged(f"step {step}: {name} is {value}")


@contextlib.contextmanager
def one_line_errors():
    """main()'s wrapper: a bad file, a diverged run, a bad checkpoint or Ctrl-C ends it in one line, not a traceback."""
    try:
        yield
    except Diverged as e:
        raise stop(f"error: {e}; nothing was written") from None
    except (ValueError, OSError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except ProcessLost:
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if rank() == 0:
            print("interrupted; nothing half-written", file=sys.stderr)
        raise SystemExit(130) from None
