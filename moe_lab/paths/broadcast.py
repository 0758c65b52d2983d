"""Broadcast dispatch, and its all-gather / reduce-scatter sibling.

Who holds what: each rank owns its T_r tokens (data-parallel attention). Both variants first
exchange the token counts (metadata), then give every rank the whole batch so it can run its
experts on the pairs routed to them, then sum the partial outputs and keep each rank's rows.

`broadcast` (one broadcast per source rank, as the `naive` all2all backend of vLLM 0.9.0.1 does,
the default there):
    dispatch: for each source rank, broadcast its tokens (T_src, H), expert ids and weights;
    combine: all_reduce the (T, H) partial outputs, then each rank keeps its own rows.
    Bytes: every token row reaches every rank, and the combine all-reduces the whole batch:
    T * H * element_size through all_reduce (2(n-1)/n of it per rank on a ring).
`allgather_reducescatter` (the default all2all backend of vLLM 0.11.0):
    dispatch: all_gather tokens, ids and weights, each padded to the largest rank's count;
    combine: reduce_scatter the padded (n * T_max, H) partials, so each rank receives only its
    own summed rows. Bytes per rank: (n-1) * T_max rows each way in dispatch, and the
    reduce-scatter of n * T_max rows (a ring moves (n-1)/n of it; gloo runs a full all-reduce).
Ragged batches are padded to T_max; the padding crosses the wire and is counted.

Both cost the same for any routing. Right choice when: most tokens need most ranks anyway
(top-k large against the number of ranks), or as a simple baseline with no host sync.
"""

from __future__ import annotations

import torch

from ..comm import RecordingComm
from ..routing import Placement
from .base import (
    Dispatched,
    PathOptions,
    PendingDispatch,
    RankBatch,
    decode_rows,
    empty_rows,
    encode_rows,
    local_pairs,
    weighted_sum_rows,
)


def exchange_counts(comm: RecordingComm, tokens: int) -> list[int]:
    """Exchange every rank's token count with an all_gather of one int64 (metadata phase)."""
    with comm.phase("metadata"):
        counts = comm.all_gather(torch.tensor([tokens], dtype=torch.int64, device=comm.device), what="counts")
        return counts.tolist()  # host sync


def _combine_dtype(dispatched: Dispatched, batch: RankBatch) -> torch.dtype:
    return dispatched.combine_dtype or batch.x.dtype


class Broadcast:
    name = "broadcast"
    holds_whole_batch = False

    @staticmethod
    def dispatch(comm: RecordingComm, batch: RankBatch, placement: Placement, options: PathOptions) -> PendingDispatch:
        counts = exchange_counts(comm, batch.x.shape[0])

        # One broadcast per source rank and tensor; ranks with no tokens send nothing.
        row_parts, id_parts, weight_parts = [], [], []
        for src, count in enumerate(counts):
            mine = src == comm.rank
            rows = encode_rows(batch.x, options) if mine else empty_rows(count, batch.x, options)
            ids = batch.topk_ids if mine else batch.topk_ids.new_empty(count, batch.topk_ids.shape[1])
            weights = batch.topk_weights if mine else batch.topk_weights.new_empty(count, batch.topk_weights.shape[1])
            if count:
                for tensor, what in rows:
                    comm.broadcast(tensor, src, what=what, async_op=options.overlap)
                comm.broadcast(ids, src, what="expert_ids", async_op=options.overlap)
                comm.broadcast(weights, src, what="weights", async_op=options.overlap)
            row_parts.append([tensor for tensor, _ in rows])
            id_parts.append(ids)
            weight_parts.append(weights)

        def finish() -> Dispatched:
            x_all = torch.cat([decode_rows(parts, options, batch.x.dtype) for parts in row_parts])  # (T, H), rank-major
            token_index, local_expert, weights = local_pairs(torch.cat(id_parts), torch.cat(weight_parts), placement, comm.rank)
            return Dispatched(
                tokens=x_all[token_index],
                local_expert=local_expert,
                token_index=token_index,
                weights=weights,
                n_rows=x_all.shape[0],
                counts=counts,
                combine_dtype=options.combine_dtype,
            )

        return PendingDispatch(comm, finish)

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        partial = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)
        partial = partial.to(_combine_dtype(dispatched, batch))  # (T, H)
        if dispatched.n_rows:
            comm.all_reduce(partial, what="tokens")
        start = sum(dispatched.counts[: comm.rank])
        out = partial[start : start + batch.x.shape[0]].float()  # (T_r, H): keep own rows
        if shared_out is not None:
            out += shared_out.float()
        return out.to(batch.x.dtype)


class AllGatherReduceScatter:
    name = "allgather_reducescatter"
    holds_whole_batch = False

    @staticmethod
    def dispatch(comm: RecordingComm, batch: RankBatch, placement: Placement, options: PathOptions) -> PendingDispatch:
        counts = exchange_counts(comm, batch.x.shape[0])
        t_max = max(counts)
        if t_max == 0:  # no rank has tokens: nothing to gather
            def finish_empty() -> Dispatched:
                no_rows = torch.empty(0, dtype=torch.int64, device=batch.x.device)
                return Dispatched(batch.x[:0], no_rows, no_rows, batch.topk_weights.new_empty(0), 0, counts=counts)

            return PendingDispatch(comm, finish_empty)

        # Pad to T_max rows so every rank hands all_gather the same shape.
        pad = t_max - batch.x.shape[0]
        gathered_rows = [
            comm.all_gather(tensor, what=what, async_op=options.overlap)
            for tensor, what in encode_rows(torch.nn.functional.pad(batch.x, (0, 0, 0, pad)), options)
        ]  # each (n * T_max, ...)
        ids_all = comm.all_gather(torch.nn.functional.pad(batch.topk_ids, (0, 0, 0, pad)), what="expert_ids", async_op=options.overlap)
        weights_all = comm.all_gather(torch.nn.functional.pad(batch.topk_weights, (0, 0, 0, pad)), what="weights", async_op=options.overlap)

        def finish() -> Dispatched:
            x_all = decode_rows(gathered_rows, options, batch.x.dtype)  # (n * T_max, H)
            # Padding rows route nowhere: drop their pairs.
            row = torch.arange(comm.world_size * t_max, device=batch.x.device)
            valid = (row % t_max) < torch.tensor(counts, device=batch.x.device).repeat_interleave(t_max)
            token_index, local_expert, weights = local_pairs(ids_all[valid], weights_all[valid], placement, comm.rank)
            padded_index = valid.nonzero().flatten()[token_index]  # row in the padded layout
            return Dispatched(
                tokens=x_all[padded_index],
                local_expert=local_expert,
                token_index=padded_index,
                weights=weights,
                n_rows=comm.world_size * t_max,
                counts=counts,
                combine_dtype=options.combine_dtype,
            )

        return PendingDispatch(comm, finish)

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        tokens = batch.x.shape[0]
        if dispatched.n_rows == 0:
            return batch.x.new_empty(0, batch.x.shape[1])
        partial = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)
        mine = comm.reduce_scatter(partial.to(_combine_dtype(dispatched, batch)), what="tokens")  # (T_max, H)
        out = mine[:tokens].float()
        if shared_out is not None:
            out += shared_out.float()
        return out.to(batch.x.dtype)


broadcast = Broadcast()
allgather_reducescatter = AllGatherReduceScatter()
