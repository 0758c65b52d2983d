"""Shared parts of the exercise checks: results, running the attendee's code, and small workloads."""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass

import torch

from ..compare import local_layer, rank_batch, reference_output, relative_error
from ..comm import RecordingComm
from ..launch import RankContext, RankError, run_ranks
from ..paths import PathOptions, get_path, moe_forward
from ..workload import WorkloadSpec, build_workload


@dataclass
class CheckResult:
    """The outcome of one exercise check: true when correct, with a message either way."""

    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return ("Correct. " if self.passed else "Not yet. ") + self.message

    def __repr__(self) -> str:
        return str(self)


def source_of(function) -> str:
    """The source text of the attendee's function, so ranks can run it (spawned ranks cannot
    import a notebook's functions)."""
    try:
        return textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError) as err:
        raise TypeError(
            f"cannot read the source of {function!r}: define it with `def` in a notebook cell or a file"
        ) from err


def load_function(source: str, name: str):
    """Run `source` in a fresh namespace with torch imported and return its function `name`."""
    namespace = {"torch": torch}
    exec(compile(source, f"<exercise {name}>", "exec"), namespace)
    return namespace[name]


def call_safely(function, *args):
    """(value, None) or (None, CheckResult) naming the exception the attendee's code raised."""
    try:
        return function(*args), None
    except NotImplementedError:
        return None, CheckResult(False, f"{function.__name__} is not written yet: replace the `raise NotImplementedError` line.")
    except Exception as err:  # the attendee's code may raise anything; report it plainly
        return None, CheckResult(False, f"{function.__name__} raised {type(err).__name__}: {err}")


def run_user_path(ctx: RankContext, spec: WorkloadSpec, base_path: str, step: str, source: str, name: str) -> dict:
    """Rank function: run `base_path` with its `step` replaced by the attendee's function."""
    user_function = load_function(source, name)
    base = type(get_path(base_path))
    path = type(f"Exercise{base.__name__}", (base,), {step: staticmethod(user_function)})()
    workload = build_workload(spec)
    layer = local_layer(workload, ctx.rank, ctx.device)
    comm = RecordingComm(device=ctx.device)
    batch = rank_batch(workload, ctx.rank, False, ctx.device)
    comm.reset()
    output = moe_forward(path, comm, layer, batch, PathOptions())
    return {"output": output.cpu(), "records": [record.to_dict() for record in comm.records]}


def run_with_user_step(spec: WorkloadSpec, base_path: str, step: str, function) -> tuple[list[dict], float] | CheckResult:
    """Run the path on real gloo ranks with the attendee's step.

    Returns per-rank results and the error against the reference, or a failed CheckResult
    when a rank raised.
    """
    workload = build_workload(spec)
    try:
        per_rank = run_ranks(
            run_user_path, (spec, base_path, step, source_of(function), function.__name__),
            world_size=workload.world_size, backend="gloo", timeout_s=30,
        )
    except RankError as err:
        where = [line.strip() for line in err.remote_traceback.splitlines() if line.strip().startswith('File "<exercise')]
        detail = f" ({where[-1]})" if where else ""
        return CheckResult(False, f"on real ranks, {str(err).splitlines()[0]}{detail}")
    reference = reference_output(workload)
    scale = float(reference.abs().max()) if reference.numel() else 1.0
    errors = []
    for rank, result in enumerate(per_rank):
        start = workload.token_offset(rank)
        errors.append(relative_error(result["output"], reference[start : start + workload.tokens_per_rank[rank]], scale))
    return per_rank, max(errors)


def owner_and_ids(spec: WorkloadSpec, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids of `rank`, owner table) of a workload, as the attendee's functions receive them."""
    workload = build_workload(spec)
    return workload.routing.topk_ids[rank], workload.placement.owner_table()
