"""The byte model: what each path hands to each collective, and what crosses the wire.

This module is the one place with the formulas. For each path, one function lists the
collective calls the path makes on a workload, as `Transfer`s. A transfer names the phase and
the collective, the payload each rank hands it, and the wire bytes from each rank to each rank
under the backend's algorithm (from `wire`). Everything else derives from that list: per-rank bytes sent and
received per phase, payload bytes, the (src, dst) traffic matrices of the figures, and the
calls the cost model prices. Tests compare the totals with what the recording communicator
counted and with what the OS measured.

The functions are written from the paths' definitions, not from their code, so a test that
compares them with the recorded calls checks the paths. To model a new path, write one
function `(workload, backend, options) -> list[Transfer]` and add it to `PATH_MODELS`; `options`
(a `PathOptions`) sets the format token rows travel in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import wire
from .paths.base import PathOptions, chunk_bounds
from .routing import Routing
from .quant import n_blocks
from .workload import Workload

COUNT_BYTES = 8  # one int64 token count
WEIGHT_BYTES = 4  # one float32 routing weight
PHASES = ("metadata", "dispatch", "combine")


@dataclass(frozen=True)
class Transfer:
    """One collective call of a path, as every rank makes it."""

    phase: str  # metadata, dispatch or combine
    op: str  # the RecordingComm method: all_reduce, broadcast, all_gather, reduce_scatter, all_to_all_single
    what: str  # tokens, scales (of fp8 tokens), expert_ids, weights, counts
    payload: list[int]  # per rank: bytes of the tensor handed to the collective
    matrix: list[list[int]]  # matrix[src][dst]: wire bytes src sends to dst (diagonal zero)
    local: list[int] | None = None  # per rank: bytes the library copies from input to output itself

    def local_bytes(self, rank: int) -> int:
        return self.local[rank] if self.local else 0

    def sent(self, rank: int) -> int:
        return sum(self.matrix[rank])

    def received(self, rank: int) -> int:
        return sum(row[rank] for row in self.matrix)

    def max_wire_bytes(self) -> int:
        """Largest bytes any rank sends or receives: what sets the call's time on a link."""
        n = len(self.matrix)
        return max((max(self.sent(rank), self.received(rank)) for rank in range(n)), default=0)

    def max_local_bytes(self) -> int:
        return max((self.local_bytes(rank) for rank in range(len(self.matrix))), default=0)


# -- shapes ----------------------------------------------------------------------------


def row_bytes(workload: Workload) -> int:
    """Bytes of one token row (H elements of the layer dtype)."""
    return workload.cfg.hidden * torch.empty(0, dtype=workload.dtype).element_size()


def id_bytes(workload: Workload) -> int:
    """Bytes of one expert id, in the routing's id dtype."""
    return workload.routing.topk_ids[0].element_size()


def dispatch_row_parts(workload: Workload, options: PathOptions) -> list[tuple[str, int]]:
    """(what, bytes per row) of the tensors dispatch sends per token row: fp8 adds one float32 scale per 128 channels."""
    hidden = workload.cfg.hidden
    if options.dispatch_dtype == "fp8":
        return [("tokens", hidden), ("scales", 4 * n_blocks(hidden))]
    if options.dispatch_dtype == "bfloat16":
        return [("tokens", 2 * hidden)]
    return [("tokens", row_bytes(workload))]


def dispatch_row_bytes(workload: Workload, options: PathOptions) -> int:
    """Bytes of one token row as dispatch sends it, scales included."""
    return sum(size for _, size in dispatch_row_parts(workload, options))


def combine_row_bytes(workload: Workload, options: PathOptions) -> int:
    """Bytes of one result row as combine sends it: bfloat16 whenever dispatch is compressed."""
    return 2 * workload.cfg.hidden if options.combine_dtype is not None else row_bytes(workload)


def pair_matrix(workload: Workload) -> list[list[int]]:
    """pairs[src][dst]: (token, expert) pairs of rank src whose expert lives on rank dst."""
    n = workload.world_size
    pairs = [[0] * n for _ in range(n)]
    for src, ids in enumerate(workload.routing.topk_ids):
        owners = workload.placement.owner(ids.reshape(-1))
        for dst, count in enumerate(torch.bincount(owners, minlength=n).tolist()):
            pairs[src][dst] = count
    return pairs


def rank_pair_matrix(workload: Workload) -> list[list[int]]:
    """rows[src][dst]: tokens of rank src with at least one expert on rank dst."""
    n = workload.world_size
    rows = [[0] * n for _ in range(n)]
    for src, ids in enumerate(workload.routing.topk_ids):
        owners = workload.placement.owner(ids)  # (T, k)
        for dst in range(n):
            rows[src][dst] = int((owners == dst).any(dim=1).sum())
    return rows


def _same_payload(nbytes: int, world_size: int) -> list[int]:
    return [nbytes] * world_size


# -- one function per path --------------------------------------------------------------


def allreduce_transfers(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """Naive all-reduce: one all_reduce of the whole (T, H) batch, whatever the routing."""
    n = workload.world_size
    nbytes = workload.total_tokens * row_bytes(workload)
    if not workload.total_tokens:
        return []
    return [Transfer("combine", "all_reduce", "tokens", _same_payload(nbytes, n), wire.all_reduce_matrix(nbytes, n, backend))]


def _count_exchange(workload: Workload, backend: str) -> Transfer:
    n = workload.world_size
    return Transfer("metadata", "all_gather", "counts", _same_payload(COUNT_BYTES, n),
                    wire.all_gather_matrix(COUNT_BYTES, n, backend), _same_payload(COUNT_BYTES, n))


def _per_token(workload: Workload, options: PathOptions) -> list[tuple[str, int]]:
    """(what, bytes per token) of the tensors the gathering paths send for each token."""
    k = workload.cfg.top_k
    return dispatch_row_parts(workload, options) + [("expert_ids", k * id_bytes(workload)), ("weights", k * WEIGHT_BYTES)]


def broadcast_transfers(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """Count exchange, one broadcast per source rank of tokens, ids and weights, all_reduce back."""
    n = workload.world_size
    transfers = [_count_exchange(workload, backend)]
    for src, count in enumerate(workload.tokens_per_rank):
        if count == 0:
            continue  # a rank with no tokens broadcasts nothing
        for what, size in _per_token(workload, options):
            nbytes = count * size
            transfers.append(
                Transfer("dispatch", "broadcast", what, _same_payload(nbytes, n), wire.broadcast_matrix(nbytes, src, n, backend))
            )
    if workload.total_tokens:
        nbytes = workload.total_tokens * combine_row_bytes(workload, options)
        transfers.append(Transfer("combine", "all_reduce", "tokens", _same_payload(nbytes, n), wire.all_reduce_matrix(nbytes, n, backend)))
    return transfers


def allgather_reducescatter_transfers(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """Count exchange, all_gather of tokens, ids and weights padded to T_max, reduce_scatter back."""
    n = workload.world_size
    t_max = max(workload.tokens_per_rank)
    transfers = [_count_exchange(workload, backend)]
    if t_max == 0:
        return transfers
    for what, size in _per_token(workload, options):
        chunk = t_max * size
        transfers.append(Transfer("dispatch", "all_gather", what, _same_payload(chunk, n),
                                  wire.all_gather_matrix(chunk, n, backend), _same_payload(chunk, n)))
    nbytes = n * t_max * combine_row_bytes(workload, options)
    transfers.append(Transfer("combine", "reduce_scatter", "tokens", _same_payload(nbytes, n), wire.reduce_scatter_matrix(nbytes, n, backend)))
    return transfers


def alltoall_transfers(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """Count exchange, one row and one expert id per (token, remote expert) pair, rows back."""
    return _all_to_all_transfers(workload, pair_matrix(workload), [("expert_ids", id_bytes(workload))], options)


def alltoall_dedup_transfers(workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """Count exchange, one row per (token, remote rank) with k expert slots and weights, one summed row back."""
    k = workload.cfg.top_k
    slots = [("expert_ids", k * id_bytes(workload)), ("weights", k * WEIGHT_BYTES)]
    return _all_to_all_transfers(workload, rank_pair_matrix(workload), slots, options)


def _all_to_all_transfers(
    workload: Workload, rows: list[list[int]], row_metadata: list[tuple[str, int]], options: PathOptions
) -> list[Transfer]:
    """List the calls of the all-to-all paths: rows[src][dst] rows go out with their metadata, results come back."""
    n = workload.world_size
    back = [[rows[src][dst] for src in range(n)] for dst in range(n)]  # combine: back[dst][src]
    ones = [[1] * n for _ in range(n)]
    sent_rows = [sum(rows[rank]) for rank in range(n)]  # every row, local ones included, is in the send buffer
    served_rows = [sum(back[rank]) for rank in range(n)]
    own = [rows[rank][rank] for rank in range(n)]  # rows a rank sends to itself: copied, not sent
    transfers = [
        Transfer("metadata", "all_to_all_single", "counts", _same_payload(n * COUNT_BYTES, n),
                 wire.all_to_all_matrix(ones, COUNT_BYTES), _same_payload(COUNT_BYTES, n)),
    ]
    for what, size in dispatch_row_parts(workload, options) + row_metadata:
        transfers.append(Transfer("dispatch", "all_to_all_single", what, [r * size for r in sent_rows],
                                  wire.all_to_all_matrix(rows, size), [r * size for r in own]))
    result = combine_row_bytes(workload, options)
    transfers.append(Transfer("combine", "all_to_all_single", "tokens", [r * result for r in served_rows],
                              wire.all_to_all_matrix(back, result), [r * result for r in own]))
    return transfers


PATH_MODELS = {
    "allreduce": allreduce_transfers,
    "broadcast": broadcast_transfers,
    "allgather_reducescatter": allgather_reducescatter_transfers,
    "alltoall": alltoall_transfers,
    "alltoall_dedup": alltoall_dedup_transfers,
}


# -- what the rest of the kit reads -----------------------------------------------------


def path_transfers(path: str, workload: Workload, backend: str, options: PathOptions = PathOptions()) -> list[Transfer]:
    """List the collective calls `path` makes on `workload`, in the order it makes them.

    An overlapped variant runs the path once per chunk of every rank's tokens, so its calls
    are those of each chunk in turn.
    """
    if path not in PATH_MODELS:
        raise KeyError(f"no byte model for path {path!r}; models exist for {', '.join(PATH_MODELS)}")
    if not options.overlap:
        return PATH_MODELS[path](workload, backend, options)
    return [
        transfer
        for chunk in chunk_workloads(workload, options.chunks)
        for transfer in PATH_MODELS[path](chunk, backend, options)
    ]


def chunk_workloads(workload: Workload, chunks: int) -> list[Workload]:
    """Cut the workload into `chunks` pieces as the overlapped paths cut it: piece c of every rank."""
    bounds = [chunk_bounds(tokens, chunks) for tokens in workload.tokens_per_rank]
    pieces = []
    for chunk in range(chunks):
        spans = [rank_bounds[chunk] for rank_bounds in bounds]
        pieces.append(replace(
            workload,
            tokens_per_rank=[stop - start for start, stop in spans],
            hidden=[h[start:stop] for h, (start, stop) in zip(workload.hidden, spans)],
            routing=Routing(
                [ids[start:stop] for ids, (start, stop) in zip(workload.routing.topk_ids, spans)],
                [w[start:stop] for w, (start, stop) in zip(workload.routing.topk_weights, spans)],
            ),
        ))
    return pieces


def per_rank_by_phase(transfers: list[Transfer], world_size: int, kind: str) -> list[dict[str, int]]:
    """Per rank and phase, bytes of `kind`: "sent", "received" or "payload"."""
    result = [{phase: 0 for phase in PHASES} for _ in range(world_size)]
    for transfer in transfers:
        for rank in range(world_size):
            if kind == "sent":
                value = transfer.sent(rank)
            elif kind == "received":
                value = transfer.received(rank)
            elif kind == "payload":
                value = transfer.payload[rank]
            else:
                raise ValueError(f"kind must be sent, received or payload, got {kind!r}")
            result[rank][transfer.phase] += value
    return result


def expected_sent_bytes(
    path: str, workload: Workload, backend: str, options: PathOptions = PathOptions()
) -> list[dict[str, int]]:
    """Per rank, the bytes `path` sends to other ranks in each phase."""
    return per_rank_by_phase(path_transfers(path, workload, backend, options), workload.world_size, "sent")


def expected_received_bytes(
    path: str, workload: Workload, backend: str, options: PathOptions = PathOptions()
) -> list[dict[str, int]]:
    """Per rank, the bytes `path` receives from other ranks in each phase."""
    return per_rank_by_phase(path_transfers(path, workload, backend, options), workload.world_size, "received")


def expected_payload_bytes(
    path: str, workload: Workload, backend: str, options: PathOptions = PathOptions()
) -> list[dict[str, int]]:
    """Per rank, the bytes of the tensors `path` hands to collectives in each phase."""
    return per_rank_by_phase(path_transfers(path, workload, backend, options), workload.world_size, "payload")


def traffic_matrix(transfers: list[Transfer], world_size: int, phase: str | None = None) -> list[list[int]]:
    """matrix[src][dst]: wire bytes from src to dst over all calls (or one phase's calls)."""
    total = wire.zero_matrix(world_size)
    for transfer in transfers:
        if phase is None or transfer.phase == phase:
            for src in range(world_size):
                for dst in range(world_size):
                    total[src][dst] += transfer.matrix[src][dst]
    return total


def token_bytes_lower_bound(workload: Workload, options: PathOptions = PathOptions()) -> list[int]:
    """Per rank, the fewest token-row bytes any dispatch can send: one row per remote (token, rank) pair."""
    rows = rank_pair_matrix(workload)
    n = workload.world_size
    row = dispatch_row_bytes(workload, options)
    return [sum(rows[rank][dst] for dst in range(n) if dst != rank) * row for rank in range(n)]


def token_bytes_sent(records: list[dict], phase: str | None = None) -> int:
    """Token-row bytes (fp8 scales included) a rank sent to other ranks, from its recorded collectives."""
    return sum(
        record["sent_bytes"]
        for record in records
        if record["what"] in ("tokens", "scales") and (phase is None or record["phase"] == phase)
    )
