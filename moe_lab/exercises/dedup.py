"""Exercise: deduplicate the all-to-all per destination rank."""

from __future__ import annotations

import torch

from ..bytes_model import token_bytes_lower_bound, token_bytes_sent
from ..workload import WorkloadSpec, build_workload
from .common import CheckResult, call_safely, run_with_user_step

CHECK_SPEC = WorkloadSpec(preset="tiny", world_size=2, tokens=(9, 5), routing="uniform")


def check_dedup(rows_per_destination) -> CheckResult:
    """Run the deduplicated all-to-all on 2 real ranks with the attendee's `rows_per_destination`.

    rows_per_destination(topk_ids (T, k), owner (E,), world_size) -> (source_token, destination):
    one entry per (token, rank) pair where the token has an expert on that rank, sorted by
    destination rank, then token.
    """
    workload = build_workload(CHECK_SPEC)
    owner = workload.placement.owner_table()
    for rank, topk_ids in enumerate(workload.routing.topk_ids):
        value, failure = call_safely(rows_per_destination, topk_ids, owner, workload.world_size)
        if failure is not None:
            return failure
        source_token, destination = (torch.as_tensor(v) for v in value)
        expected = {(t, int(r)) for t in range(topk_ids.shape[0]) for r in owner[topk_ids[t]].unique()}
        returned_pairs = list(zip(source_token.tolist(), destination.tolist()))
        if len(returned_pairs) != len(set(returned_pairs)):
            return CheckResult(False, f"on rank {rank}, some (token, rank) pair appears twice: each token goes to a rank at most once")
        if set(returned_pairs) != expected:
            missing = sorted(expected - set(returned_pairs))[:3]
            extra = sorted(set(returned_pairs) - expected)[:3]
            return CheckResult(False, f"on rank {rank}, missing pairs {missing}, unexpected pairs {extra}")
        if returned_pairs != sorted(returned_pairs, key=lambda pair: (pair[1], pair[0])):
            return CheckResult(False, f"on rank {rank}, sort the rows by destination rank, then by token")

    outcome = run_with_user_step(CHECK_SPEC, "alltoall_dedup", "rows", rows_per_destination)
    if isinstance(outcome, CheckResult):
        return outcome
    per_rank, error = outcome
    if error > 1e-5:
        return CheckResult(False, f"the layer output is off by {error:.2g} (relative) from the reference on real ranks.")
    bound = token_bytes_lower_bound(workload)
    sent = [token_bytes_sent(result["records"], phase="dispatch") for result in per_rank]
    if sent != bound:
        return CheckResult(False, f"ranks sent {sent} token bytes in dispatch; the lower bound is {bound}")
    return CheckResult(True, f"2 real ranks matched the reference and sent {sent} token bytes: the lower bound.")
