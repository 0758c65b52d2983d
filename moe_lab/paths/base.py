"""Shared parts of every path: the batch a rank brings, the dispatch result, and the layer driver.

A path is a `dispatch` and a `combine` with the same signatures in every module:

    dispatch(comm, batch, placement, options) -> PendingDispatch   .wait() gives a Dispatched
    combine(comm, expert_out, dispatched, shared_out, batch) -> output rows

`moe_forward` runs dispatch, the grouped expert compute, and combine, each in its own timed
phase, so the paths differ only in how rows move between ranks. With `options.overlap` the
token collectives of dispatch are issued asynchronously: the shared experts run while the first
chunk's tokens are in flight, and each chunk's expert compute runs while the next chunk's
tokens are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..comm import RecordingComm
from ..moe import ExpertWeights, SharedExpertWeights, grouped_expert_forward, shared_expert_forward
from ..quant import dequantize_blockwise, n_blocks, quantize_blockwise
from ..routing import Placement

DISPATCH_DTYPES = ("bfloat16", "fp8")


@dataclass(frozen=True)
class PathOptions:
    """Options for how a path moves rows; the defaults give the plain path."""

    dispatch_dtype: str | None = None  # None: the layer's dtype; "bfloat16"; "fp8": e4m3 with per-block scales
    overlap: bool = False  # issue token collectives asynchronously and overlap them with compute
    chunks: int = 2  # with overlap: pieces each rank's tokens are split into

    @property
    def combine_dtype(self) -> torch.dtype | None:
        """Results travel back in bfloat16 when dispatch is compressed, else in the layer's dtype."""
        return torch.bfloat16 if self.dispatch_dtype is not None else None

    @property
    def label(self) -> str:
        parts = []
        if self.dispatch_dtype:
            parts.append(self.dispatch_dtype)
        if self.overlap:
            parts.append("overlap")
        return "+".join(parts)


def chunk_bounds(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """(start, stop) of `chunks` contiguous, nearly equal pieces of `tokens` rows; some may be empty."""
    bounds = torch.linspace(0, tokens, chunks + 1).round().long().tolist()
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class RankBatch:
    """The tokens one rank brings to the layer."""

    x: torch.Tensor  # (T_r, H) this rank's own tokens
    topk_ids: torch.Tensor  # (T_r, k)
    topk_weights: torch.Tensor  # (T_r, k) float32
    offset: int  # row of this rank's first token in the whole batch
    # Every rank's tokens in rank order, for paths that hold the whole batch (naive all-reduce).
    x_all: torch.Tensor | None = None  # (T, H)
    topk_ids_all: torch.Tensor | None = None  # (T, k)
    topk_weights_all: torch.Tensor | None = None  # (T, k)

    def split(self, chunks: int) -> list[tuple[int, int, RankBatch]]:
        """(start, stop, sub-batch) for `chunks` contiguous pieces of the own tokens; some may be empty."""
        return [
            (start, stop, replace(self, x=self.x[start:stop], topk_ids=self.topk_ids[start:stop],
                                  topk_weights=self.topk_weights[start:stop], offset=self.offset + start))
            for start, stop in chunk_bounds(self.x.shape[0], chunks)
        ]


@dataclass(frozen=True)
class Dispatched:
    """Rows that reached this rank's experts, and what combine needs to send results home."""

    tokens: torch.Tensor  # (N, H) one row per (token, local expert) pair
    local_expert: torch.Tensor  # (N,) index into this rank's experts
    token_index: torch.Tensor  # (N,) row of the combine buffer each result adds to
    weights: torch.Tensor | None  # (N,) routing weights, applied where token_index points
    n_rows: int  # rows of the combine buffer
    input_splits: list[int] | None = None  # rows this rank sent to each rank (all-to-all paths)
    output_splits: list[int] | None = None  # rows this rank received from each rank (all-to-all paths)
    counts: list[int] | None = None  # tokens held by each rank (paths that gather tokens)
    source_token: torch.Tensor | None = None  # (S,) own token of each row sent away (deduplicated all-to-all)
    combine_dtype: torch.dtype | None = None  # dtype results travel back in; None: the layer's dtype


class PendingDispatch:
    """A dispatch whose collectives may still be in flight; `wait()` completes it."""

    def __init__(self, comm: RecordingComm, finish: Callable[[], Dispatched]):
        self._comm, self._finish = comm, finish

    def wait(self) -> Dispatched:
        self._comm.wait_all()
        return self._finish()


@dataclass
class LocalLayer:
    """The part of the MoE layer one rank holds."""

    placement: Placement
    experts: ExpertWeights  # this rank's routed experts, in local order
    shared: SharedExpertWeights | None  # replicated on every rank


def encode_rows(x: torch.Tensor, options: PathOptions) -> list[tuple[torch.Tensor, str]]:
    """Token rows as the tensors dispatch sends: (rows, "tokens") and, for fp8, (scales, "scales")."""
    if options.dispatch_dtype == "fp8":
        q, scales = quantize_blockwise(x)
        return [(q, "tokens"), (scales, "scales")]
    if options.dispatch_dtype == "bfloat16":
        return [(x.to(torch.bfloat16), "tokens")]
    return [(x, "tokens")]


def empty_rows(rows: int, like: torch.Tensor, options: PathOptions) -> list[tuple[torch.Tensor, str]]:
    """Receive buffers matching `encode_rows` for `rows` rows shaped like `like` (N, H)."""
    hidden = like.shape[1]
    template = encode_rows(like[:0], options)
    return [
        (torch.empty(rows, (hidden if what == "tokens" else n_blocks(hidden)), dtype=t.dtype, device=like.device), what)
        for t, what in template
    ]


def decode_rows(parts: list[torch.Tensor], options: PathOptions, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode_rows`: token rows in the layer's `dtype`."""
    if options.dispatch_dtype == "fp8":
        return dequantize_blockwise(parts[0], parts[1], dtype)
    return parts[0].to(dtype)


def local_pairs(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: Placement, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_index, local_expert, weight) of every (token, expert) pair whose expert is on `rank`."""
    mine = placement.owner(topk_ids) == rank  # (T, k)
    token_index, _ = mine.nonzero(as_tuple=True)  # token-major order
    return token_index, placement.local_index(topk_ids[mine]), topk_weights[mine]


def weighted_sum_rows(
    expert_out: torch.Tensor, token_index: torch.Tensor, weights: torch.Tensor | None, n_rows: int
) -> torch.Tensor:
    """Add each expert output row, times its weight, to its token's row: (n_rows, H) float32."""
    out = torch.zeros(n_rows, expert_out.shape[1], dtype=torch.float32, device=expert_out.device)
    rows = expert_out.float()
    if weights is not None:
        rows = rows * weights.float().unsqueeze(1)
    out.index_add_(0, token_index, rows)
    return out


def moe_forward(
    path, comm: RecordingComm, layer: LocalLayer, batch: RankBatch, options: PathOptions = PathOptions()
) -> torch.Tensor:
    """Run one MoE layer through `path`; phases dispatch, compute and combine are timed."""
    if options.overlap:
        return _moe_forward_overlapped(path, comm, layer, batch, options)
    with comm.phase("dispatch"):
        dispatched = path.dispatch(comm, batch, layer.placement, options).wait()
    with comm.phase("compute"):
        expert_out = grouped_expert_forward(dispatched.tokens, dispatched.local_expert, layer.experts)
        shared_out = shared_expert_forward(batch.x, layer.shared)  # (T_r, H) or None
    with comm.phase("combine"):
        return path.combine(comm, expert_out, dispatched, shared_out, batch)


def _moe_forward_overlapped(path, comm: RecordingComm, layer: LocalLayer, batch: RankBatch, options: PathOptions) -> torch.Tensor:
    """Pipeline over chunks: chunk c+1's tokens travel while chunk c's experts compute.

    The time left in the `dispatch` phase is the communication that compute did not hide. On
    gloo the asynchronous collectives run on gloo's own threads. On NCCL they run on NCCL's
    stream while the experts run on the current stream, and `wait` makes the current stream
    wait for them.
    NOTE: the NCCL overlap has not been run here (no GPU machine was available); the gloo
    overlap is what the tests check.
    """
    if path.holds_whole_batch:
        raise ValueError(f"path {path.name!r} has no dispatch to overlap; overlap applies to paths that dispatch tokens")
    chunks = batch.split(options.chunks)

    with comm.phase("dispatch"):
        pending = path.dispatch(comm, chunks[0][2], layer.placement, options)
    with comm.phase("compute"):
        shared_out = shared_expert_forward(batch.x, layer.shared)  # runs while chunk 0 is in flight
    with comm.phase("dispatch"):
        dispatched = pending.wait()

    outputs = []
    for index, (start, stop, chunk) in enumerate(chunks):
        last = index + 1 == len(chunks)
        if not last:
            with comm.phase("dispatch"):
                pending = path.dispatch(comm, chunks[index + 1][2], layer.placement, options)
        with comm.phase("compute"):
            expert_out = grouped_expert_forward(dispatched.tokens, dispatched.local_expert, layer.experts)
        if not last:
            with comm.phase("dispatch"):
                next_dispatched = pending.wait()
        with comm.phase("combine"):
            shared_chunk = None if shared_out is None else shared_out[start:stop]
            outputs.append(path.combine(comm, expert_out, dispatched, shared_chunk, chunk))
        if not last:
            dispatched = next_dispatched
    return torch.cat(outputs)
