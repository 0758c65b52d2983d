"""Naive all-reduce: every rank holds the whole batch and the partial outputs are summed.

Who holds what: as after tensor-parallel attention, every rank has all T tokens and their
routing. Each rank runs its own experts on the (token, expert) pairs routed to them and
writes weighted results into a (T, H) buffer that is zero elsewhere; one `all_reduce` sums the
buffers, so every rank ends with the whole layer output. Shared experts are computed by each
rank for its own tokens only and added before the sum, so they count once.

Bytes per rank: all_reduce of T * H * element_size, which a ring moves 2(n-1)/n of each way.
That cost does not depend on routing: with every expert local it is paid in full.
Right choice when: the batch is replicated anyway (tensor-parallel attention), batches are
small (decode), and the link is fast; it needs no metadata exchange and no host sync.
"""

from __future__ import annotations

import torch

from ..comm import RecordingComm
from ..routing import Placement
from .base import Dispatched, PathOptions, PendingDispatch, RankBatch, local_pairs, weighted_sum_rows


class AllReduce:
    name = "allreduce"
    holds_whole_batch = True

    @staticmethod
    def dispatch(comm: RecordingComm, batch: RankBatch, placement: Placement, options: PathOptions) -> PendingDispatch:
        # No communication: the whole batch is already on every rank.
        def finish() -> Dispatched:
            token_index, local_expert, weights = local_pairs(
                batch.topk_ids_all, batch.topk_weights_all, placement, comm.rank
            )
            return Dispatched(
                tokens=batch.x_all[token_index],  # (N, H)
                local_expert=local_expert,
                token_index=token_index,
                weights=weights,
                n_rows=batch.x_all.shape[0],
            )

        return PendingDispatch(comm, finish)

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        partial = weighted_sum_rows(expert_out, dispatched.token_index, dispatched.weights, dispatched.n_rows)  # (T, H)
        if shared_out is not None:
            own = slice(batch.offset, batch.offset + batch.x.shape[0])
            partial[own] += shared_out.float()
        partial = partial.to(batch.x_all.dtype)
        if dispatched.n_rows:
            comm.all_reduce(partial, what="tokens")
        return partial  # (T, H) on every rank


allreduce = AllReduce()
