"""All-to-all: each (token, expert) pair goes only to the rank that holds the expert.

Who holds what: each rank owns its T_r tokens. Dispatch sorts the rank's T_r * k pairs by
destination rank, exchanges the per-rank counts with one all_to_all_single (metadata), then
sends one token row per pair, and the pair's local expert index, with all_to_all_single and
per-rank splits. The destination runs its experts on what it received and sends the results
back with the splits swapped; the source multiplies by the routing weights and sums per token.

Buffer layouts (rows):
    send buffer   [ to rank 0 | to rank 1 | ... ]            rank-major, token order within a rank
    recv buffer   [ from rank 0 | from rank 1 | ... ]        output_splits[r] rows from rank r
    combine sends the recv buffer's results back in the same order, so no second permutation
    is needed at the destination.

Bytes per rank: (pairs whose expert is remote) * H * element_size each way, plus one expert
index per pair (in the routing's id dtype) and 8 bytes per peer for the counts. Pairs for local
experts never leave the rank, so local-only routing sends no token rows. Because a token is
copied once per remote expert, top-6 of 64 experts on 2 ranks sends about 3 copies of every
token: about 3x the bytes of an all-gather. `alltoall_dedup` sends each token once per rank.
Right choice when: routing is mostly local, or top_k is small against the number of ranks.
Costs one host sync (the counts) per layer.
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
    encode_rows,
    weighted_sum_rows,
)


def exchange_splits(comm: RecordingComm, input_splits: torch.Tensor) -> tuple[list[int], list[int]]:
    """Token count exchange: rows this rank sends to, and receives from, each rank (metadata phase)."""
    ones = [1] * comm.world_size
    with comm.phase("metadata"):
        output_splits = comm.all_to_all_single(input_splits, ones, ones, what="counts")
        return input_splits.tolist(), output_splits.tolist()  # host sync


def permute_by_destination(topk_ids: torch.Tensor, owner: torch.Tensor, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order this rank's (token, expert) pairs by destination rank.

    topk_ids (T, k) are flattened row-major into T*k pairs; owner (E,) maps an expert to its
    rank. Returns (order, input_splits): pairs[order] are rank-major, and input_splits[r] of
    them go to rank r.
    """
    destination = owner[topk_ids.reshape(-1).long()]  # (T*k,)
    order = torch.argsort(destination, stable=True)
    return order, torch.bincount(destination, minlength=world_size)


def send_back(comm: RecordingComm, results: torch.Tensor, dispatched: Dispatched, dtype: torch.dtype) -> torch.Tensor:
    """Send results home with the splits swapped, in the order they came (the reverse trip)."""
    travel_dtype = dispatched.combine_dtype or dtype
    returned = comm.all_to_all_single(results.to(travel_dtype), dispatched.output_splits, dispatched.input_splits, what="tokens")
    return returned


class AllToAll:
    name = "alltoall"
    holds_whole_batch = False

    permute = staticmethod(permute_by_destination)

    @classmethod
    def dispatch(cls, comm: RecordingComm, batch: RankBatch, placement: Placement, options: PathOptions) -> PendingDispatch:
        tokens, k = batch.topk_ids.shape

        # Permute pairs rank-major, then exchange how many each rank will receive.
        order, input_splits = cls.permute(batch.topk_ids, placement.owner_table().to(batch.x.device), comm.world_size)
        input_splits, output_splits = exchange_splits(comm, input_splits)
        local_expert = placement.local_index(batch.topk_ids.reshape(-1))  # (T_r*k,)

        # Send one token row and one local expert index per pair.
        token_of_pair = torch.arange(tokens, device=batch.x.device).repeat_interleave(k)[order]
        received_rows = [
            comm.all_to_all_single(tensor, input_splits, output_splits, what=what, async_op=options.overlap)
            for tensor, what in encode_rows(batch.x[token_of_pair], options)
        ]
        received_expert = comm.all_to_all_single(
            local_expert[order].to(batch.topk_ids.dtype), input_splits, output_splits, what="expert_ids",
            async_op=options.overlap,
        )

        def finish() -> Dispatched:
            return Dispatched(
                tokens=decode_rows(received_rows, options, batch.x.dtype),  # (N_recv, H)
                local_expert=received_expert.long(),
                token_index=token_of_pair,  # source side: the token each sent row came from
                weights=batch.topk_weights.reshape(-1)[order],  # applied at the source after the return trip
                n_rows=tokens,
                input_splits=input_splits,
                output_splits=output_splits,
                combine_dtype=options.combine_dtype,
            )

        return PendingDispatch(comm, finish)

    @staticmethod
    def combine(comm: RecordingComm, expert_out: torch.Tensor, dispatched: Dispatched, shared_out, batch: RankBatch) -> torch.Tensor:
        returned = send_back(comm, expert_out, dispatched, batch.x.dtype)

        # Unpermute: weight each result and add it to its token's row.
        out = weighted_sum_rows(returned, dispatched.token_index, dispatched.weights, dispatched.n_rows)  # (T_r, H)
        if shared_out is not None:
            out += shared_out.float()
        return out.to(batch.x.dtype)


alltoall = AllToAll()
