"""All-to-all deduplicated per destination rank: each token crosses to a rank at most once.

Who holds what: each rank owns its T_r tokens. For every (token, rank) pair where the token has
at least one expert on that rank, dispatch sends the token row once, together with the token's
k expert slots for that rank: the local expert index (-1 where the expert lives elsewhere) and
its routing weight. The destination runs each row through its experts, sums their weighted
outputs per row, and sends one row back per (token, rank); the source adds them per token.

Buffer layouts (rows):
    send buffer   [ to rank 0 | to rank 1 | ... ]     one row per (token, destination rank)
    slots         (rows, k) local expert index or -1, and (rows, k) weights, same order
    destination   expands rows to (row, expert) pairs, computes, sums back to one row per row

Bytes per rank: (distinct remote (token, rank) pairs) * H * element_size each way, the lower
bound for sending token rows, plus k expert indices and k float32 weights per row, and 8 bytes
per peer for the counts. With top-6 of 64 experts on 2 ranks that is at most one copy of each
token instead of about 3. Right choice when: top_k is large against the number of ranks, as in
DeepSeek-V2-Lite on 2 to 8 GPUs. Costs one host sync (the counts) per layer, like `alltoall`.
"""

from __future__ import annotations

import torch

from ..comm import RecordingComm
from ..routing import Placement
from .alltoall import exchange_splits, send_back
from .base import (
    Dispatched,
    PathOptions,
    PendingDispatch,
    RankBatch,
    decode_rows,
    encode_rows,
    weighted_sum_rows,
)


def rows_per_destination(topk_ids: torch.Tensor, owner: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List one row per (token, rank) pair where the token has at least one expert on that rank.

    topk_ids (T, k); owner (E,) maps an expert to its rank. Returns (source_token, destination),
    sorted by destination rank, then token.
    """
    ranks = torch.arange(world_size, device=topk_ids.device)
    on_rank = owner[topk_ids.long()].unsqueeze(0) == ranks.view(-1, 1, 1)  # (n, T, k)
    destination, source_token = on_rank.any(dim=2).nonzero(as_tuple=True)
    return source_token, destination


def expert_slots(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, placement: Placement,
    source_token: torch.Tensor, destination: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the token's k local expert indices on the row's rank (-1 elsewhere) and weights."""
    slot_mask = placement.owner(topk_ids)[source_token] == destination.unsqueeze(1)  # (rows, k)
    local = placement.local_index(topk_ids)[source_token]
    experts = torch.where(slot_mask, local, torch.full_like(local, -1))
    weight_slots = torch.where(slot_mask, topk_weights[source_token], torch.zeros_like(topk_weights[source_token]))
    return experts, weight_slots


class AllToAllDedup:
    name = "alltoall_dedup"
    holds_whole_batch = False

    rows = staticmethod(rows_per_destination)

    @classmethod
    def dispatch(cls, comm: RecordingComm, batch: RankBatch, placement: Placement, options: PathOptions) -> PendingDispatch:
        source_token, destination = cls.rows(batch.topk_ids, placement.owner_table().to(batch.x.device), comm.world_size)
        slots, weight_slots = expert_slots(batch.topk_ids, batch.topk_weights, placement, source_token, destination)
        input_splits, output_splits = exchange_splits(comm, torch.bincount(destination, minlength=comm.world_size))

        # One token row per (token, destination rank), with that rank's expert and weight slots.
        received_rows = [
            comm.all_to_all_single(tensor, input_splits, output_splits, what=what, async_op=options.overlap)
            for tensor, what in encode_rows(batch.x[source_token], options)
        ]
        received_experts = comm.all_to_all_single(
            slots.to(batch.topk_ids.dtype), input_splits, output_splits, what="expert_ids", async_op=options.overlap
        )
        received_weights = comm.all_to_all_single(
            weight_slots, input_splits, output_splits, what="weights", async_op=options.overlap
        )

        def finish() -> Dispatched:
            rows = decode_rows(received_rows, options, batch.x.dtype)  # (N_recv, H)
            valid = received_experts >= 0  # (N_recv, k)
            row_of_pair, slot = valid.nonzero(as_tuple=True)
            return Dispatched(
                tokens=rows[row_of_pair],  # (pairs, H)
                local_expert=received_experts[row_of_pair, slot].long(),
                token_index=row_of_pair,  # destination side: pairs sum into their received row
                weights=received_weights[row_of_pair, slot],
                n_rows=rows.shape[0],
                input_splits=input_splits,
                output_splits=output_splits,
                source_token=source_token,
                combine_dtype=options.combine_dtype,
            )

        return PendingDispatch(comm, finish)

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        # Weighted sum per received row at the destination: one result row per (token, rank).
        per_row = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)
        returned = send_back(comm, per_row, dispatched, batch.x.dtype)

        # At the source: add each rank's partial sum to its token's row.
        out = weighted_sum_rows(returned, dispatched.source_token, None, batch.x.shape[0])  # (T_r, H)
        if shared_out is not None:
            out += shared_out.float()
        return out.to(batch.x.dtype)


alltoall_dedup = AllToAllDedup()
