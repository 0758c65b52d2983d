"""The expert-parallel communication paths, side by side, all with one interface (see base)."""

from ..errors import InputError
from .allreduce import allreduce
from .alltoall import alltoall
from .alltoall_dedup import alltoall_dedup
from .base import DISPATCH_DTYPES, Dispatched, LocalLayer, PathOptions, RankBatch, moe_forward
from .broadcast import allgather_reducescatter, broadcast

PATHS = {path.name: path for path in (allreduce, broadcast, allgather_reducescatter, alltoall, alltoall_dedup)}


class UnknownPathError(InputError):
    """A path name that is not in PATHS."""


def get_path(name: str):
    if name not in PATHS:
        raise UnknownPathError(f"unknown path {name!r}; choose from {', '.join(PATHS)}")
    return PATHS[name]


__all__ = ["DISPATCH_DTYPES", "PATHS", "Dispatched", "LocalLayer", "PathOptions", "RankBatch", "get_path", "moe_forward"]
