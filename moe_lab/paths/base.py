"""What every path shares: the batch a rank holds, the dispatch result, and the layer driver.

A path is a `dispatch` and a `combine` with the same signatures in every module:

    dispatch(comm, batch, placement) -> Dispatched   rows for this rank's experts
    combine(comm, expert_out, dispatched, shared_out, batch) -> output rows

`moe_forward` runs dispatch, the shared grouped expert compute, and combine, each in its own
timed phase, so the paths differ only in how rows move between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import RecordingComm
from ..moe import ExpertWeights, SharedExpertWeights, grouped_expert_forward, shared_expert_forward
from ..routing import Placement


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


@dataclass(frozen=True)
class Dispatched:
    """Rows that reached this rank's experts, and what combine needs to send results home."""

    tokens: torch.Tensor  # (N, H) one row per (token, local expert) pair
    local_expert: torch.Tensor  # (N,) index into this rank's experts
    token_index: torch.Tensor  # (N,) row of the combine buffer each result adds to
    weights: torch.Tensor | None  # (N,) routing weights, applied on this rank; None if applied at the source
    n_rows: int  # rows of the combine buffer
    input_splits: list[int] | None = None  # rows this rank sent to each rank (all-to-all only)
    output_splits: list[int] | None = None  # rows this rank received from each rank (all-to-all only)
    counts: list[int] | None = None  # tokens held by each rank (paths that gather tokens)


@dataclass
class LocalLayer:
    """The part of the MoE layer one rank holds."""

    placement: Placement
    experts: ExpertWeights  # this rank's routed experts, in local order
    shared: SharedExpertWeights | None  # replicated on every rank


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


def moe_forward(path, comm: RecordingComm, layer: LocalLayer, batch: RankBatch) -> torch.Tensor:
    """Run one MoE layer through `path`; phases dispatch, compute and combine are timed."""
    with comm.phase("dispatch"):
        dispatched = path.dispatch(comm, batch, layer.placement)
    with comm.phase("compute"):
        expert_out = grouped_expert_forward(dispatched.tokens, dispatched.local_expert, layer.experts)
        shared_out = shared_expert_forward(batch.x, layer.shared)  # (T_r, H) or None
    with comm.phase("combine"):
        return path.combine(comm, expert_out, dispatched, shared_out, batch)
