"""Exercise: write the permutation and splits of the all-to-all dispatch."""

from __future__ import annotations

import torch

from ..workload import WorkloadSpec, build_workload
from .common import CheckResult, call_safely, run_with_user_step

CHECK_SPEC = WorkloadSpec(preset="tiny", world_size=3, tokens=(5, 0, 4), routing="uniform", placement="round_robin")


def _static_problems(function) -> CheckResult | None:
    """Catch wrong shapes, sums and order in the parent, where the message can be specific."""
    workload = build_workload(CHECK_SPEC)
    owner = workload.placement.owner_table()
    for rank, topk_ids in enumerate(workload.routing.topk_ids):
        value, failure = call_safely(function, topk_ids, owner, workload.world_size)
        if failure is not None:
            return failure
        if not (isinstance(value, tuple) and len(value) == 2):
            return CheckResult(False, f"{function.__name__} must return a tuple (order, input_splits), got {type(value).__name__}")
        order, splits = (torch.as_tensor(v) for v in value)
        pairs = topk_ids.numel()
        if sorted(order.tolist()) != list(range(pairs)):
            return CheckResult(False, f"on rank {rank}, order must list each of the {pairs} pairs once, got {order.tolist()}")
        if splits.tolist() and (len(splits) != workload.world_size or int(splits.sum()) != pairs):
            return CheckResult(False, (
                f"on rank {rank}, input_splits must have one count per rank ({workload.world_size}) summing to {pairs}, "
                f"got {splits.tolist()}"
            ))
        destination = owner[topk_ids.reshape(-1)][order]
        if (destination[1:] < destination[:-1]).any():
            where = int((destination[1:] < destination[:-1]).nonzero()[0]) + 1
            return CheckResult(False, (
                f"on rank {rank}, pairs are not rank-major: position {where} goes to rank {int(destination[where])} "
                f"after a pair for rank {int(destination[where - 1])}"
            ))
    return None


def check_splits(permute_by_destination) -> CheckResult:
    """Run the all-to-all path on 3 real ranks with the attendee's `permute_by_destination`.

    permute_by_destination(topk_ids (T, k), owner (E,), world_size) -> (order, input_splits)
    """
    problem = _static_problems(permute_by_destination)
    if problem is not None:
        return problem
    outcome = run_with_user_step(CHECK_SPEC, "alltoall", "permute", permute_by_destination)
    if isinstance(outcome, CheckResult):
        return outcome
    per_rank, error = outcome
    if error > 1e-5:
        return CheckResult(False, f"the layer output is off by {error:.2g} (relative) from the reference on real ranks.")
    return CheckResult(True, (
        f"3 real ranks (one of them idle) ran the all-to-all with your permutation and matched the "
        f"reference (relative error {error:.1g})."
    ))
