"""Broadcast dispatch, and its all-gather / reduce-scatter sibling.

Who holds what: each rank owns its T_r tokens (data-parallel attention). Both variants first
exchange the token counts (metadata), then give every rank the whole batch so it can run its
experts on the pairs routed to them, then sum the partial outputs and keep each rank's rows.

`broadcast` (one broadcast per source rank, as vLLM's former naive all2all backend did):
    dispatch: for each source rank, broadcast its tokens (T_src, H), expert ids and weights;
    combine: all_reduce the (T, H) partial outputs, then each rank keeps its own rows.
    Bytes: every token row reaches every rank, and the combine all-reduces the whole batch:
    T * H * element_size through all_reduce (2(n-1)/n of it per rank on a ring).
`allgather_reducescatter` (vLLM's default EP backend since v0.10):
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
from .base import Dispatched, RankBatch, local_pairs, weighted_sum_rows


def exchange_counts(comm: RecordingComm, tokens: int) -> list[int]:
    """Every rank's token count, via an all_gather of one int64 (metadata phase)."""
    with comm.phase("metadata"):
        counts = comm.all_gather(torch.tensor([tokens], dtype=torch.int64, device=comm.device), what="counts")
        return counts.tolist()  # host sync


class Broadcast:
    name = "broadcast"
    holds_whole_batch = False

    @staticmethod
    def dispatch(comm: RecordingComm, batch: RankBatch, placement: Placement) -> Dispatched:
        counts = exchange_counts(comm, batch.x.shape[0])

        # One broadcast per source rank and tensor; ranks with no tokens send nothing.
        x_parts, id_parts, weight_parts = [], [], []
        for src, count in enumerate(counts):
            mine = src == comm.rank
            x = batch.x if mine else batch.x.new_empty(count, batch.x.shape[1])
            ids = batch.topk_ids if mine else batch.topk_ids.new_empty(count, batch.topk_ids.shape[1])
            weights = batch.topk_weights if mine else batch.topk_weights.new_empty(count, batch.topk_weights.shape[1])
            if count:
                comm.broadcast(x, src, what="tokens")
                comm.broadcast(ids, src, what="expert_ids")
                comm.broadcast(weights, src, what="weights")
            x_parts.append(x)
            id_parts.append(ids)
            weight_parts.append(weights)
        x_all = torch.cat(x_parts)  # (T, H): the whole batch, rank-major

        token_index, local_expert, weights = local_pairs(torch.cat(id_parts), torch.cat(weight_parts), placement, comm.rank)
        return Dispatched(
            tokens=x_all[token_index],
            local_expert=local_expert,
            token_index=token_index,
            weights=weights,
            n_rows=x_all.shape[0],
            counts=counts,
        )

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        partial = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)
        partial = partial.to(batch.x.dtype)  # (T, H)
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
    def dispatch(comm: RecordingComm, batch: RankBatch, placement: Placement) -> Dispatched:
        counts = exchange_counts(comm, batch.x.shape[0])
        t_max = max(counts)
        if t_max == 0:  # no rank has tokens: nothing to gather
            empty = batch.x.new_empty(0, batch.x.shape[1])
            no_rows = torch.empty(0, dtype=torch.int64, device=batch.x.device)
            return Dispatched(empty, no_rows, no_rows, batch.topk_weights.new_empty(0), 0, counts=counts)

        # Pad to T_max rows so every rank hands all_gather the same shape.
        pad = t_max - batch.x.shape[0]
        x_all = comm.all_gather(torch.nn.functional.pad(batch.x, (0, 0, 0, pad)), what="tokens")  # (n*T_max, H)
        ids_all = comm.all_gather(torch.nn.functional.pad(batch.topk_ids, (0, 0, 0, pad)), what="expert_ids")
        weights_all = comm.all_gather(torch.nn.functional.pad(batch.topk_weights, (0, 0, 0, pad)), what="weights")

        # Padding rows route nowhere: give them weight 0 and drop their pairs.
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
        )

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        tokens = batch.x.shape[0]
        if dispatched.n_rows == 0:
            return batch.x.new_empty(0, batch.x.shape[1])
        partial = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)
        mine = comm.reduce_scatter(partial.to(batch.x.dtype), what="tokens")  # (T_max, H)
        out = mine[:tokens].float()
        if shared_out is not None:
            out += shared_out.float()
        return out.to(batch.x.dtype)


broadcast = Broadcast()
allgather_reducescatter = AllGatherReduceScatter()
