"""
Run under torchrun by tests/test_distributed.py (not a test itself): several scripts' main() one after another in
one start of the processes, since each start costs seconds (three Pythons importing torch). The runs are separated
by "--", each a script's name and its flags:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_driver.py \
        sft --stage=pretrain --n_layer=1 ... -- reward --steps=2 ...

The driver joins the process group once, for all the runs (runs.data_parallel then joins no other). Two more words
may come first: `checks` runs the cross-process checks below; `--fail_at_step=K` makes rank 1 raise a ValueError at
its K-th optimizer step, while rank 0 waits for its gradients.
"""
import importlib
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402
import stages  # noqa: E402
import runs  # noqa: E402


def cross_process_checks():
    """What every process must agree on, with 2 gloo processes: whitening over both shares is the whitening of the
    whole batch; a nan in one process stops both; an on_rank_0 function gives everyone rank 0's result."""
    r = runs.rank()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))  # the same global batch in both processes
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    whole = ppo.masked_whiten(x, mask)  # every process: the whole batch, then the rows of its share
    assert torch.allclose(ppo.masked_whiten(runs.my_share(x), runs.my_share(mask)), runs.my_share(whole),
                          atol=1e-6)
    try:
        runs.check_finite(3, loss=float("nan") if r == 1 else 1.0)
        raise AssertionError("rank 0 went on although rank 1 diverged")
    except runs.Diverged as e:
        assert str(e) == "step 3: loss is nan", e

    @runs.on_rank_0
    def draw():
        assert not runs.distributed()  # inside, rank 0 is one process on its own
        return torch.randn(3).tolist()
    drawn = [None, None]
    dist.all_gather_object(drawn, draw())
    assert drawn[0] == drawn[1]
    assert runs.mean_over_processes({"a": float(r)}) == {"a": 0.5}


def fail_on_rank_1(at_step):
    original, calls = stages.optimizer_step, [0]

    def failing(*args, **kwargs):
        if calls[0] == at_step:
            raise ValueError(f"rank 1 gives up at step {at_step}")
        calls[0] += 1
        return original(*args, **kwargs)
    if os.environ["RANK"] == "1":
        stages.optimizer_step = failing  # the stages call it through the module, so this reaches them all


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    args = sys.argv[1:]
    if args[0] == "checks":
        cross_process_checks()
        args.pop(0)
    if args[0].startswith("--fail_at_step="):
        fail_on_rank_1(int(args.pop(0).split("=")[1]))
    for run in " ".join(args).split(" -- "):
        script, *flags = run.split()
        sys.argv = [f"{script}.py", *flags]
        importlib.import_module(script).main()
    dist.destroy_process_group()
