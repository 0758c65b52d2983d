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


# -- who sends to whom ---------------------------------------------------------------
#
# matrix[src][dst]: bytes rank src sends to rank dst for one call, for the traffic matrices.
# Row sums equal the per-rank sent bytes above, which the tests check against the OS counters.
# NOTE: the destinations (not the row sums) follow the algorithms' published structure: ring
# collectives send to the next rank, gloo's broadcast to its binomial-tree children, NCCL's
# broadcast to the next rank in the chain. The OS counters only measure row sums, so with more
# than two ranks the split of a row over destinations is modelled, not measured.


def zero_matrix(world_size: int) -> list[list[int]]:
    return [[0] * world_size for _ in range(world_size)]


def ring_matrix(per_rank_bytes: int, world_size: int) -> list[list[int]]:
    """Build the matrix of a ring in which each rank sends `per_rank_bytes` to the next rank."""
    matrix = zero_matrix(world_size)
    if world_size > 1:
        for rank in range(world_size):
            matrix[rank][(rank + 1) % world_size] = per_rank_bytes
    return matrix


def binomial_child_ranks(rank: int, root: int, world_size: int) -> list[int]:
    """Ranks that `rank` forwards to in gloo's binomial broadcast tree rooted at `root`."""
    virtual = (rank - root) % world_size
    children, step = [], 1
    while step < world_size:
        if step > virtual and virtual + step < world_size:
            children.append((virtual + step + root) % world_size)
        step *= 2
    return children


def all_reduce_matrix(nbytes: int, world_size: int, backend: str) -> list[list[int]]:
    return ring_matrix(all_reduce_wire(nbytes, world_size, backend)[0], world_size)


def reduce_scatter_matrix(input_nbytes: int, world_size: int, backend: str) -> list[list[int]]:
    return ring_matrix(reduce_scatter_wire(input_nbytes, world_size, backend)[0], world_size)


def all_gather_matrix(chunk_nbytes: int, world_size: int, backend: str) -> list[list[int]]:
    return ring_matrix(all_gather_wire(chunk_nbytes, world_size, backend)[0], world_size)


def broadcast_matrix(nbytes: int, root: int, world_size: int, backend: str) -> list[list[int]]:
    matrix = zero_matrix(world_size)
    for rank in range(world_size):
        if backend == "gloo":
            for child in binomial_child_ranks(rank, root, world_size):
                matrix[rank][child] = nbytes
        elif broadcast_wire(nbytes, rank, root, world_size, backend)[0]:
            matrix[rank][(rank + 1) % world_size] = nbytes
    return matrix


def all_to_all_matrix(rows: list[list[int]], row_nbytes: int) -> list[list[int]]:
    """rows[src][dst]: rows rank src sends to rank dst; a rank's rows to itself never leave it."""
    n = len(rows)
    return [[0 if src == dst else rows[src][dst] * row_nbytes for dst in range(n)] for src in range(n)]
