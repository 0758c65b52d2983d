"""Analytic bytes each rank sends per phase, one function per path, from shapes and routing.

These are written from the paths' definitions, not from their code, so a test that compares
them with what the recording communicator counted checks the paths. Per-collective wire
formulas come from `wire`.
"""

from __future__ import annotations

import torch

from . import wire
from .paths.base import PathOptions
from .quant import n_blocks
from .workload import Workload

COUNT_BYTES = 8  # one int64 token count


def _zero(world_size: int) -> list[dict[str, int]]:
    return [{"metadata": 0, "dispatch": 0, "combine": 0} for _ in range(world_size)]


def _sizes(workload: Workload) -> tuple[int, int, int, int]:
    """(row bytes, expert-id bytes per token, weight bytes per token, top_k)."""
    cfg = workload.cfg
    ids_itemsize = workload.routing.topk_ids[0].element_size()
    row = cfg.hidden * torch.empty(0, dtype=workload.dtype).element_size()
    return row, cfg.top_k * ids_itemsize, cfg.top_k * 4, cfg.top_k


def dispatch_row_bytes(workload: Workload, options: PathOptions) -> int:
    """Bytes of one token row as dispatch sends it: fp8 adds one float32 scale per 128 channels."""
    hidden = workload.cfg.hidden
    if options.dispatch_dtype == "fp8":
        return hidden + 4 * n_blocks(hidden)
    if options.dispatch_dtype == "bfloat16":
        return 2 * hidden
    return _sizes(workload)[0]


def combine_row_bytes(workload: Workload, options: PathOptions) -> int:
    """Bytes of one result row as combine sends it: bfloat16 whenever dispatch is compressed."""
    return 2 * workload.cfg.hidden if options.combine_dtype is not None else _sizes(workload)[0]


def allreduce_bytes(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[dict[str, int]]:
    n = workload.world_size
    row, _, _, _ = _sizes(workload)
    result = _zero(n)
    for rank in range(n):
        result[rank]["combine"] = wire.all_reduce_wire(workload.total_tokens * row, n, backend)[0]
    return result


def broadcast_bytes(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[dict[str, int]]:
    n = workload.world_size
    _, ids_per_token, weights_per_token, _ = _sizes(workload)
    row, result_row = dispatch_row_bytes(workload, options), combine_row_bytes(workload, options)
    result = _zero(n)
    for rank in range(n):
        result[rank]["metadata"] = wire.all_gather_wire(COUNT_BYTES, n, backend)[0]
        for src, count in enumerate(workload.tokens_per_rank):
            if count:
                for per_token in (row, ids_per_token, weights_per_token):
                    result[rank]["dispatch"] += wire.broadcast_wire(count * per_token, rank, src, n, backend)[0]
        if workload.total_tokens:
            result[rank]["combine"] = wire.all_reduce_wire(workload.total_tokens * result_row, n, backend)[0]
    return result


def allgather_reducescatter_bytes(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[dict[str, int]]:
    n = workload.world_size
    _, ids_per_token, weights_per_token, _ = _sizes(workload)
    row, result_row = dispatch_row_bytes(workload, options), combine_row_bytes(workload, options)
    t_max = max(workload.tokens_per_rank)
    result = _zero(n)
    for rank in range(n):
        result[rank]["metadata"] = wire.all_gather_wire(COUNT_BYTES, n, backend)[0]
        if t_max:
            for per_token in (row, ids_per_token, weights_per_token):
                result[rank]["dispatch"] += wire.all_gather_wire(t_max * per_token, n, backend)[0]
            result[rank]["combine"] = wire.reduce_scatter_wire(n * t_max * result_row, n, backend)[0]
    return result


def pair_matrix(workload: Workload) -> list[list[int]]:
    """pairs[src][dst]: (token, expert) pairs of rank src whose expert lives on rank dst."""
    n = workload.world_size
    pairs = [[0] * n for _ in range(n)]
    for src, ids in enumerate(workload.routing.topk_ids):
        owners = workload.placement.owner(ids.reshape(-1))
        for dst, count in enumerate(torch.bincount(owners, minlength=n).tolist()):
            pairs[src][dst] = count
    return pairs


def alltoall_bytes(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[dict[str, int]]:
    n = workload.world_size
    _, ids_per_token, _, k = _sizes(workload)
    row, result_row = dispatch_row_bytes(workload, options), combine_row_bytes(workload, options)
    id_bytes = ids_per_token // k
    pairs = pair_matrix(workload)
    result = _zero(n)
    for rank in range(n):
        remote_out = sum(pairs[rank][dst] for dst in range(n) if dst != rank)  # pairs this rank sends away
        remote_in = sum(pairs[src][rank] for src in range(n) if src != rank)  # pairs it serves for others
        result[rank]["metadata"] = (n - 1) * COUNT_BYTES
        result[rank]["dispatch"] = remote_out * (row + id_bytes)
        result[rank]["combine"] = remote_in * result_row
    return result


def rank_pair_matrix(workload: Workload) -> list[list[int]]:
    """rows[src][dst]: tokens of rank src with at least one expert on rank dst."""
    n = workload.world_size
    rows = [[0] * n for _ in range(n)]
    for src, ids in enumerate(workload.routing.topk_ids):
        owners = workload.placement.owner(ids)  # (T, k)
        for dst in range(n):
            rows[src][dst] = int((owners == dst).any(dim=1).sum())
    return rows


def alltoall_dedup_bytes(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[dict[str, int]]:
    n = workload.world_size
    _, ids_per_token, weights_per_token, _ = _sizes(workload)
    row, result_row = dispatch_row_bytes(workload, options), combine_row_bytes(workload, options)
    rows = rank_pair_matrix(workload)
    result = _zero(n)
    for rank in range(n):
        remote_out = sum(rows[rank][dst] for dst in range(n) if dst != rank)
        remote_in = sum(rows[src][rank] for src in range(n) if src != rank)
        result[rank]["metadata"] = (n - 1) * COUNT_BYTES
        result[rank]["dispatch"] = remote_out * (row + ids_per_token + weights_per_token)
        result[rank]["combine"] = remote_in * result_row
    return result


def token_bytes_lower_bound(workload: Workload, options: PathOptions = PathOptions()) -> list[int]:
    """Per rank, the fewest token-row bytes any dispatch can send: one row per remote (token, rank) pair."""
    rows = rank_pair_matrix(workload)
    n = workload.world_size
    row = dispatch_row_bytes(workload, options)
    return [sum(rows[rank][dst] for dst in range(n) if dst != rank) * row for rank in range(n)]


EXPECTED_BYTES = {
    "allreduce": allreduce_bytes,
    "broadcast": broadcast_bytes,
    "allgather_reducescatter": allgather_reducescatter_bytes,
    "alltoall": alltoall_bytes,
    "alltoall_dedup": alltoall_dedup_bytes,
}


def expected_sent_bytes(
    path: str, workload: Workload, backend: str, options: PathOptions = PathOptions()
) -> list[dict[str, int]]:
    """Per rank, the bytes `path` sends to other ranks in each phase."""
    return EXPECTED_BYTES[path](workload, backend, options)


def token_bytes_sent(records: list[dict], phase: str | None = None) -> int:
    """Token-row bytes (fp8 scales included) a rank sent to other ranks, from its recorded collectives."""
    return sum(
        record["sent_bytes"]
        for record in records
        if record["what"] in ("tokens", "scales") and (phase is None or record["phase"] == phase)
    )
