"""Bytes one rank puts on the wire for each collective, by backend algorithm.

A collective is handed a payload; what crosses the links depends on the library's algorithm.
These formulas give the bytes a rank sends to, and receives from, the other ranks. The gloo
ones were checked against the bytes gloo wrote to its sockets (`/proc/self/io` wchar) in
torch 2.13 on 2 to 6 ranks; tests keep checking them.

gloo:
    all_reduce       ring: reduce-scatter then all-gather, 2(n-1)/n of the buffer each way
    reduce_scatter   gloo runs a full ring all-reduce of the input: 2(n-1)/n of the input
    all_gather       (n-1) times the per-rank chunk each way
    broadcast        binomial tree: a rank sends one copy per child, each non-root receives one
    all_to_all       exactly the rows each rank sends to other ranks
nccl (ring algorithms; NCCL may pick a tree for all_reduce, which moves the same bytes per rank):
    all_reduce 2(n-1)/n, reduce_scatter (n-1)/n of the input, all_gather (n-1) chunks,
    broadcast a pipelined chain (every rank but the last forwards the buffer once),
    all_to_all exact.
"""

from __future__ import annotations


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    return (2 * (world_size - 1) * nbytes) // world_size


def binomial_children(rank: int, root: int, world_size: int) -> int:
    """Children of `rank` in gloo's binomial broadcast tree rooted at `root`."""
    virtual = (rank - root) % world_size
    children, step = 0, 1
    while step < world_size:
        if step > virtual and virtual + step < world_size:
            children += 1
        step *= 2
    return children


def all_reduce_wire(nbytes: int, world_size: int, backend: str) -> tuple[int, int]:
    moved = ring_all_reduce_bytes(nbytes, world_size)
    return moved, moved


def reduce_scatter_wire(input_nbytes: int, world_size: int, backend: str) -> tuple[int, int]:
    if backend == "gloo":
        moved = ring_all_reduce_bytes(input_nbytes, world_size)
    else:
        moved = ((world_size - 1) * input_nbytes) // world_size
    return moved, moved


def all_gather_wire(chunk_nbytes: int, world_size: int, backend: str) -> tuple[int, int]:
    moved = (world_size - 1) * chunk_nbytes
    return moved, moved


def broadcast_wire(nbytes: int, rank: int, root: int, world_size: int, backend: str) -> tuple[int, int]:
    received = 0 if rank == root else nbytes
    if backend == "gloo":
        return binomial_children(rank, root, world_size) * nbytes, received
    last_in_chain = (rank - root) % world_size == world_size - 1
    return (0 if last_in_chain or world_size == 1 else nbytes), received


def all_to_all_wire(
    send_rows: list[int], recv_rows: list[int], row_nbytes: int, rank: int
) -> tuple[int, int]:
    sent = sum(rows for peer, rows in enumerate(send_rows) if peer != rank) * row_nbytes
    received = sum(rows for peer, rows in enumerate(recv_rows) if peer != rank) * row_nbytes
    return sent, received
