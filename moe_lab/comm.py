"""The recording communicator: the only place the paths' collectives are issued.

Each collective is logged with its phase, the payload it was handed, the bytes this rank sends
to and receives from other ranks under the backend's algorithm (see `wire`), and on gloo the
bytes the process really wrote to its sockets: the change in `wchar` of /proc/self/io. Only
sent bytes can be read this way, because gloo receives with recv(2), which Linux does not count
in `rchar`. Phases are timed by a clock that
uses CUDA events on GPUs and `time.perf_counter` on CPU.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import wire
from .monitor import RankMonitor, mark_collective_error

PROC_IO = "/proc/self/io"
# dtypes gloo has no kernels for: broadcast, all_gather and all_to_all send their raw bytes instead.
GLOO_RAW_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)

# torch 2.13 renamed all_gather_into_tensor and reduce_scatter_tensor; older releases lack the new names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommRecord:
    op: str  # all_reduce, broadcast, all_gather, reduce_scatter, all_to_all_single
    phase: str  # metadata, dispatch or combine
    what: str  # tokens, expert_ids, weights, counts, ...
    dtype: str
    payload_bytes: int  # bytes of the tensor handed to the collective on this rank
    sent_bytes: int  # bytes this rank sends to other ranks, for the backend's algorithm
    recv_bytes: int  # bytes this rank receives from other ranks
    os_sent_bytes: int | None  # bytes this process wrote during the call (gloo on Linux), else None
    seconds: float | None  # wall time of the call on CPU; None on CUDA (asynchronous)
    sent_to: list[int] | None = None  # sent_bytes split by destination rank (the algorithm's, see wire)

    def to_dict(self) -> dict:
        return asdict(self)


def read_wchar() -> int | None:
    """Bytes this process has written so far (all threads), or None where /proc/self/io is unavailable."""
    try:
        with open(PROC_IO, "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    fields = dict(line.split(": ") for line in text.splitlines() if ": " in line)
    return int(fields["wchar"])


class PhaseClock:
    """Times nested phases; time spent in an inner phase is not counted in the outer one.

    Every phase change closes a segment (phase, start, end). On CUDA the marks are events on
    the current stream, resolved by `segments()` after one synchronize; on CPU they are
    `perf_counter` readings.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self._stack: list[str] = []
        self._segment_start = None
        self._origin = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        """Reset the marks; times are reported relative to this call."""
        self._marks.clear()
        self._origin = self._now()

    @property
    def current(self) -> str | None:
        return self._stack[-1] if self._stack else None

    @contextmanager
    def phase(self, name: str):
        now = self._now()
        if self._stack:
            self._marks.append((self._stack[-1], self._segment_start, now))
        self._stack.append(name)
        self._segment_start = now
        try:
            yield
        except BaseException as err:
            if not hasattr(err, "moe_lab_phase"):
                err.moe_lab_phase = name  # innermost phase, for the launcher's error message
            raise
        finally:
            now = self._now()
            self._marks.append((self._stack.pop(), self._segment_start, now))
            self._segment_start = now

    def segments(self) -> list[tuple[str, float, float]]:
        """(phase, start s, end s) relative to `start()`, in order."""
        if self.cuda:
            torch.cuda.synchronize()  # host sync: resolve the events
            return [
                (name, self._origin.elapsed_time(a) / 1e3, self._origin.elapsed_time(b) / 1e3)
                for name, a, b in self._marks
            ]
        return [(name, a - self._origin, b - self._origin) for name, a, b in self._marks]

    def totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for name, start, end in self.segments():
            totals[name] = totals.get(name, 0.0) + (end - start)
        return totals


class RecordingComm:
    """Wraps one process group; every collective a path issues goes through here."""

    def __init__(
        self, group=None, device: torch.device | None = None, measure_os: bool = True, monitor: RankMonitor | None = None,
    ):
        self.group = group
        self.monitor = monitor  # publishes progress to the launcher and fires injected faults
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.device = device or torch.device("cpu")
        self.measure_os = measure_os and self.backend == "gloo" and read_wchar() is not None
        self.clock = PhaseClock(self.device)
        self.records: list[CommRecord] = []
        self._in_flight: list[tuple[str, object, object]] = []  # (description, work handle, callback) of async collectives

    # -- bookkeeping --------------------------------------------------------------

    @contextmanager
    def phase(self, name: str):
        with self.clock.phase(name):
            if self.monitor is None:
                yield
                return
            self.monitor.enter_phase(name)  # an injected fault fires here, inside the phase
            try:
                yield
            finally:
                self.monitor.exit_phase()

    def _call(self, description: str, call):
        """Run one collective and return its result; tag its exception, which may only echo another rank's failure."""
        try:
            return call()
        except BaseException as err:
            mark_collective_error(err, description)
            raise

    def _announce(self, description: str) -> None:
        if self.monitor is not None:
            self.monitor.enter_collective(description)

    def reset(self) -> None:
        if self._in_flight:
            raise RuntimeError(f"{len(self._in_flight)} asynchronous collectives were never waited for")
        self.records.clear()
        self.clock.start()

    def _sendable(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.backend == "gloo" and tensor.dtype in GLOO_RAW_DTYPES:
            return tensor.view(torch.uint8)
        return tensor

    def _check_summable(self, op: str, tensor: torch.Tensor) -> None:
        """Raise before a sum that gloo cannot do: on float8 it aborts the process (torch 2.13)."""
        if self.backend == "gloo" and tensor.dtype in GLOO_RAW_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise TypeError(
                f"{op} cannot sum {dtype} tensors on gloo, which has no float8 kernels; the kit sends "
                f"float8 as raw bytes only where nothing is summed (broadcast, all_gather, all_to_all). "
                f"Sum in bfloat16 or float32 instead"
            )

    def _run(self, op: str, what: str, tensor: torch.Tensor, wire_bytes: tuple[int, int], call, async_op: bool,
             sent_to: list[int] | None = None, after=None) -> None:
        """Issue `call(async_op)` and record it; `after` runs once the result is in place.

        An asynchronous call is recorded when issued, without OS bytes or seconds, because
        its bytes leave while other work runs; `wait_all` completes it.
        """
        description = f"{op} of {what}"
        record = CommRecord(
            op=op,
            phase=self.clock.current or "none",
            what=what,
            dtype=str(tensor.dtype).removeprefix("torch."),
            payload_bytes=tensor.numel() * tensor.element_size(),
            sent_bytes=wire_bytes[0],
            recv_bytes=wire_bytes[1],
            os_sent_bytes=None,
            seconds=None,
            sent_to=sent_to,
        )
        self.records.append(record)
        self._announce(description)  # before the clock starts, so the timing excludes it
        if async_op:
            work = self._call(description, lambda: call(True))
            self._in_flight.append((description, work, after))
            return
        before = read_wchar() if self.measure_os else None
        start = time.perf_counter()
        self._call(description, lambda: call(False))
        if self.device.type != "cuda":
            record.seconds = time.perf_counter() - start
        if before is not None:
            record.os_sent_bytes = read_wchar() - before
        if after is not None:
            after()

    def wait_all(self) -> None:
        """Wait for every asynchronous collective issued so far."""
        in_flight, self._in_flight = self._in_flight, []
        for description, work, after in in_flight:
            self._call(description, work.wait)
            if after is not None:
                after()

    # -- collectives --------------------------------------------------------------
    # Each returns its output tensor at once. With async_op=True the tensor is valid only after
    # `wait_all()`; with NCCL the collective then runs on NCCL's own stream while the default
    # stream computes.

    def all_reduce(self, tensor: torch.Tensor, what: str = "tokens", async_op: bool = False) -> torch.Tensor:
        """Sum `tensor` over ranks, in place."""
        self._check_summable("all_reduce", tensor)
        buffer = tensor.contiguous()  # collectives read and write raw storage
        nbytes = buffer.numel() * buffer.element_size()
        self._run(
            "all_reduce", what, buffer,
            wire.all_reduce_wire(nbytes, self.world_size, self.backend),
            lambda async_op: dist.all_reduce(buffer, group=self.group, async_op=async_op),
            async_op, sent_to=wire.all_reduce_matrix(nbytes, self.world_size, self.backend)[self.rank], after=None if buffer is tensor else lambda: tensor.copy_(buffer),
        )
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int, what: str = "tokens", async_op: bool = False) -> torch.Tensor:
        """Copy `tensor` from rank `src` to every rank, in place."""
        buffer = tensor.contiguous()  # a strided view would send the wrong elements
        nbytes = buffer.numel() * buffer.element_size()
        self._run(
            "broadcast", what, buffer,
            wire.broadcast_wire(nbytes, self.rank, src, self.world_size, self.backend),
            lambda async_op: dist.broadcast(self._sendable(buffer), src=src, group=self.group, async_op=async_op),
            async_op, sent_to=wire.broadcast_matrix(nbytes, src, self.world_size, self.backend)[self.rank], after=None if buffer is tensor else lambda: tensor.copy_(buffer),
        )
        return tensor

    def all_gather(self, tensor: torch.Tensor, what: str = "tokens", async_op: bool = False) -> torch.Tensor:
        """Stack every rank's `tensor` (same shape on all ranks): (world_size * N, ...)."""
        out = torch.empty((self.world_size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        source = tensor.contiguous()
        nbytes = source.numel() * source.element_size()
        self._run(
            "all_gather", what, source,
            wire.all_gather_wire(nbytes, self.world_size, self.backend),
            lambda async_op: _all_gather_single(self._sendable(out), self._sendable(source), group=self.group, async_op=async_op),
            async_op, sent_to=wire.all_gather_matrix(nbytes, self.world_size, self.backend)[self.rank],
        )
        return out

    def reduce_scatter(self, tensor: torch.Tensor, what: str = "tokens", async_op: bool = False) -> torch.Tensor:
        """Sum `tensor` (world_size * N, ...) over ranks and return this rank's block (N, ...)."""
        self._check_summable("reduce_scatter", tensor)
        if tensor.shape[0] % self.world_size:
            raise ValueError(
                f"reduce_scatter needs dim 0 divisible by world_size={self.world_size}, got {tensor.shape[0]}"
            )
        out = torch.empty((tensor.shape[0] // self.world_size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        source = tensor.contiguous()
        nbytes = source.numel() * source.element_size()
        self._run(
            "reduce_scatter", what, source,
            wire.reduce_scatter_wire(nbytes, self.world_size, self.backend),
            lambda async_op: _reduce_scatter_single(out, source, group=self.group, async_op=async_op),
            async_op, sent_to=wire.reduce_scatter_matrix(nbytes, self.world_size, self.backend)[self.rank],
        )
        return out

    def all_to_all_single(
        self,
        tensor: torch.Tensor,
        input_splits: list[int],
        output_splits: list[int],
        what: str = "tokens",
        async_op: bool = False,
    ) -> torch.Tensor:
        """Send input_splits[r] rows of `tensor` to rank r; receive output_splits[r] rows from r."""
        out = torch.empty((sum(output_splits), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        source = tensor.contiguous()
        row_nbytes = math.prod(tensor.shape[1:]) * tensor.element_size()
        self._run(
            "all_to_all_single", what, source,
            wire.all_to_all_wire(input_splits, output_splits, row_nbytes, self.rank),
            lambda async_op: dist.all_to_all_single(
                self._sendable(out), self._sendable(source),
                output_split_sizes=output_splits, input_split_sizes=input_splits, group=self.group,
                async_op=async_op,
            ),
            async_op, sent_to=[0 if peer == self.rank else rows * row_nbytes for peer, rows in enumerate(input_splits)],
        )
        return out

    def barrier(self) -> None:
        """Align ranks; not recorded, since it is not part of any path."""
        self._announce("barrier")
        self._call("barrier", lambda: dist.barrier(group=self.group))
