"""Exercise: predict the routing locality where the all-to-all starts sending fewer bytes than the naive all-reduce."""

from __future__ import annotations

from ..bytes_model import token_bytes_sent
from ..compare import CompareOptions, run_compare_many
from ..config import MoEConfig
from ..workload import WorkloadSpec
from .common import CheckResult, call_safely

# 24 experts, top-6: full locality fits on 4 ranks, and the crossover differs between 2 and 4 ranks.
CHECK_CONFIG = MoEConfig(hidden=16, moe_intermediate=16, n_experts=24, top_k=6, name="crossover")
TOKENS = 240  # per rank: enough that random remote choices average out
TOLERANCE = 0.05


def measured_bytes(world_size: int, localities: list[float]) -> list[tuple[float, int, int]]:
    """(locality, all-reduce token bytes, all-to-all token bytes) per rank 0, measured on real ranks."""
    specs = [WorkloadSpec(preset=CHECK_CONFIG, world_size=world_size, tokens=TOKENS, routing="local", locality=p)
             for p in localities]
    results = run_compare_many(specs, CompareOptions(paths=("allreduce", "alltoall"), repeats=1, warmup=0))
    rows = []
    for p, result in zip(localities, results):
        allreduce, alltoall = (next(x for x in result.paths if x.path == name) for name in ("allreduce", "alltoall"))
        rows.append((p, token_bytes_sent(allreduce.records[0]), token_bytes_sent(alltoall.records[0])))
    return rows


def measured_crossover(rows: list[tuple[float, int, int]]) -> float:
    """Locality where the all-to-all's bytes fall to the all-reduce's, by linear interpolation."""
    for (p0, ar0, a2a0), (p1, ar1, a2a1) in zip(rows, rows[1:]):
        d0, d1 = a2a0 - ar0, a2a1 - ar1
        if d0 >= 0 >= d1:
            return p0 + (p1 - p0) * d0 / (d0 - d1) if d0 != d1 else p0
    return float("nan")


def check_crossover(predicted_crossover) -> CheckResult:
    """Compare the attendee's prediction with the crossover measured on 2 and 4 real ranks.

    predicted_crossover(top_k, world_size) -> locality p: below p the all-to-all sends more
    token bytes per rank than the naive all-reduce, above p fewer (equal tokens per rank,
    dispatch and combine counted, ids and counts ignored).
    """
    lines = []
    for world_size in (2, 4):
        answer, failure = call_safely(predicted_crossover, CHECK_CONFIG.top_k, world_size)
        if failure is not None:
            return failure
        localities = [i / 12 for i in range(13)]
        crossover = measured_crossover(measured_bytes(world_size, localities))
        lines.append(f"{world_size} ranks: you predicted {answer:.3f}, measured {crossover:.3f}")
        if abs(answer - crossover) > TOLERANCE:
            return CheckResult(False, (
                "; ".join(lines) + f" (top-{CHECK_CONFIG.top_k} of {CHECK_CONFIG.n_experts} experts). Hint: per rank, "
                "the all-reduce sends 2(n-1) token rows per token, the all-to-all sends k(1-p) rows each way."
            ))
    return CheckResult(True, "; ".join(lines) + ".")
