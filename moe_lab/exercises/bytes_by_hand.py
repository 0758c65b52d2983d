"""Exercise: compute the bytes of the naive all-reduce and of the all-to-all dispatch by hand."""

from __future__ import annotations

from ..bytes_model import token_bytes_sent
from ..compare import CompareOptions, run_compare_many
from ..workload import WorkloadSpec
from .common import CheckResult, call_safely

CHECK_SPECS = (
    WorkloadSpec(preset="tiny", world_size=2, tokens=(10, 6), routing="uniform"),
    WorkloadSpec(preset="tiny", world_size=4, tokens=(5, 0, 3, 8), routing="skewed"),
    WorkloadSpec(preset="tiny", world_size=2, tokens=7, routing="local", locality=0.5, dtype="bfloat16"),
)


def check_bytes_by_hand(allreduce_sent_bytes, alltoall_dispatch_sent_bytes) -> CheckResult:
    """Compare the attendee's formulas with the bytes real gloo ranks sent.

    allreduce_sent_bytes(total_tokens, hidden, element_size, world_size) -> bytes one rank sends
    alltoall_dispatch_sent_bytes(topk_ids, owner, rank, hidden, element_size) -> token-row bytes
        rank `rank` sends to other ranks in dispatch; topk_ids (T, k), owner (E,) expert -> rank
    """
    results = run_compare_many(list(CHECK_SPECS), CompareOptions(paths=("allreduce", "alltoall"), repeats=1, warmup=0))
    for result in results:
        workload = result.workload
        hidden, n = workload.cfg.hidden, workload.world_size
        element_size = workload.hidden[0].element_size()
        described = (f"{n} ranks, tokens per rank {workload.tokens_per_rank}, hidden {hidden}, "
                     f"{str(workload.dtype).removeprefix('torch.')} ({element_size} bytes)")
        allreduce = next(p for p in result.paths if p.path == "allreduce")
        alltoall = next(p for p in result.paths if p.path == "alltoall")
        for rank in range(n):
            measured = token_bytes_sent(allreduce.records[rank])
            answer, failure = call_safely(allreduce_sent_bytes, workload.total_tokens, hidden, element_size, n)
            if failure is not None:
                return failure
            if answer != measured:
                return CheckResult(False, (
                    f"allreduce_sent_bytes({workload.total_tokens}, {hidden}, {element_size}, {n}) returned {answer}, "
                    f"but rank {rank} sent {measured} bytes ({described}). Hint: the buffer is the whole batch, "
                    f"and a ring all-reduce sends 2(n-1)/n of it."
                ))
            measured = token_bytes_sent(alltoall.records[rank], phase="dispatch")
            owner = workload.placement.owner_table()
            answer, failure = call_safely(alltoall_dispatch_sent_bytes, workload.routing.topk_ids[rank], owner, rank, hidden, element_size)
            if failure is not None:
                return failure
            if answer != measured:
                return CheckResult(False, (
                    f"alltoall_dispatch_sent_bytes returned {answer} for rank {rank}, but it sent {measured} bytes of "
                    f"token rows ({described}). Hint: one row per (token, expert) pair whose expert is on another rank."
                ))
    return CheckResult(True, "Both formulas match the bytes real ranks sent on 2 and 4 ranks, float32 and bfloat16.")
