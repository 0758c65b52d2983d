"""Watching ranks: where each one is, and which one caused a failure.

Each rank publishes its progress (collectives entered, current path and phase, last update
time) to a `ProgressBoard` in shared memory that the launcher reads. When one rank reports
that a collective failed or timed out, the others' progress shows which rank is behind: the
rank that stopped responding has entered fewer collectives than the rank waiting for it.
`find_failure` makes that decision from plain data, so it is unit-tested without processes.

Shared memory keeps an update to about a microsecond, so publishing progress inside a timed
phase does not distort the timings (a TCPStore write is a loopback round trip).

NOTE: on NCCL a collective is counted when the host enqueues it, which can run ahead of the
GPU; the host syncs in each path keep the ranks' counts comparable, but this is not yet
checked on GPUs.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field

from .faults import FaultSpec, inject

LABEL_BYTES = 64


class _Slot(ctypes.Structure):
    # seq is odd while the rank writes, so a reader can tell a torn read and retry.
    _fields_ = [
        ("seq", ctypes.c_uint64),
        ("collectives", ctypes.c_int64),
        ("last_seen", ctypes.c_double),
        ("label", ctypes.c_char * LABEL_BYTES),
        ("collective", ctypes.c_char * LABEL_BYTES),
    ]


@dataclass(frozen=True)
class RankProgress:
    """One rank's last published position."""

    collectives: int = 0  # collectives entered; joining the process group counts as the first
    label: str = "setup"  # path/phase the rank was in
    collective: str = ""  # the last collective it entered, e.g. "all_reduce of tokens"
    last_seen: float = 0.0  # time.time() of its last update


class ProgressBoard:
    """One progress slot per rank, in shared memory created by the launcher before spawning."""

    def __init__(self, context, world_size: int):
        self.slots = context.RawArray(_Slot, world_size)
        now = time.time()
        for slot in self.slots:
            slot.last_seen = now

    def write(self, rank: int, collectives: int, label: str, collective: str) -> None:
        slot = self.slots[rank]
        slot.seq += 1
        slot.collectives = collectives
        slot.label = label.encode()[: LABEL_BYTES - 1]
        slot.collective = collective.encode()[: LABEL_BYTES - 1]
        slot.last_seen = time.time()
        slot.seq += 1

    def read(self, rank: int) -> RankProgress:
        slot = self.slots[rank]
        for _ in range(1000):
            seq = slot.seq
            if seq % 2:
                continue  # the rank is writing
            progress = self._snapshot(slot)
            if slot.seq == seq:
                return progress
        # The rank was paused or died mid-write (or kept writing): the fields are still the best guess.
        return self._snapshot(slot)

    @staticmethod
    def _snapshot(slot) -> RankProgress:
        return RankProgress(
            slot.collectives, slot.label.decode(errors="replace") or "setup",
            slot.collective.decode(errors="replace"), slot.last_seen,
        )


class RankMonitor:
    """A rank's side: publishes progress and fires the injected fault, if any, where it matches."""

    def __init__(self, rank: int, board: ProgressBoard | None = None, fault: FaultSpec | None = None):
        self.rank = rank
        self.board = board
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.path: str | None = None
        self.phases: list[str] = []
        self.stage = "setup"  # the label outside any path and phase: "setup", then "run" once the rank joined
        self.collectives = 0
        self.collective = ""

    @property
    def label(self) -> str:
        parts = [part for part in (self.path, self.phases[-1] if self.phases else None) if part]
        return "/".join(parts) or self.stage

    def _publish(self) -> None:
        if self.board is not None:
            self.board.write(self.rank, self.collectives, self.label, self.collective)

    def set_path(self, name: str | None) -> None:
        self.path = name
        self._publish()

    def enter_phase(self, name: str) -> None:
        """Record entry into phase `name`, then fire the fault if it targets this phase."""
        self.phases.append(name)
        self._publish()
        if self.fault is not None and self.fault.matches(self.rank, name, self.path):
            fault, self.fault = self.fault, None  # fire once
            inject(fault, self.label)

    def exit_phase(self) -> None:
        if self.phases:
            self.phases.pop()
        self._publish()

    def enter_collective(self, description: str) -> None:
        self.collectives += 1
        self.collective = description
        self._publish()


def mark_collective_error(err: BaseException, description: str) -> None:
    """Tag an exception raised inside a collective: it may only echo another rank's failure."""
    if getattr(err, "moe_lab_collective", None) is None:
        try:
            err.moe_lab_collective = description
        except AttributeError:  # an exception type without a __dict__
            pass


# -- deciding which rank failed ----------------------------------------------------------

OK, ERROR, EXITED, SILENT = "ok", "error", "exited", "silent"


@dataclass
class RankState:
    """The launcher's record of one rank, from its messages, exit and progress."""

    rank: int
    status: str = SILENT  # ok, error (sent an exception), exited (died without a result) or silent
    progress: RankProgress = field(default_factory=RankProgress)
    phase: str = ""  # for errors: the phase the exception names
    text: str = ""  # for errors: "Type: message"; for exits: how the process ended
    remote_traceback: str = ""
    in_collective: str | None = None  # for errors raised inside a collective: which one
    reported_at: float = 0.0  # time.time() of the error or exit
    order: int = 0  # arrival order of errors and exits, for ties


@dataclass(frozen=True)
class Failure:
    """The launcher's verdict: the rank that caused the failure and how to describe it."""

    rank: int
    phase: str
    message: str
    remote_traceback: str
    failed_at: float  # time.time() of the failure, or of the failing rank's last sign of life
    silent: bool  # the rank stopped responding: its stack is worth dumping


def find_failure(states: list[RankState], timeout_s: float, now: float, backend: str = "gloo") -> Failure:
    """Name the rank that caused a failure, from every rank's state and progress.

    1. An exception raised outside a collective is the cause: the earliest such one.
    2. Otherwise the cause is among the unfinished ranks with the fewest collectives entered,
       because the others were waiting for them. Among those, a rank that died beats one that
       went silent, which beats one whose collective raised (that error usually echoes
       another rank's failure).
    """
    primary = sorted((s for s in states if s.status == ERROR and s.in_collective is None), key=lambda s: s.order)
    if primary:
        cause = primary[0]
        return Failure(cause.rank, cause.phase, cause.text, cause.remote_traceback, cause.reported_at, False)

    unfinished = [s for s in states if s.status != OK]
    fewest = min(s.progress.collectives for s in unfinished)
    behind = [s for s in unfinished if s.progress.collectives == fewest]
    preference = {EXITED: 0, SILENT: 1, ERROR: 2}
    cause = min(behind, key=lambda s: (preference[s.status], s.order, s.rank))
    waiting = [s for s in unfinished if s.status == ERROR and s is not cause]
    waited_for = _waiting_note(waiting, cause)

    if cause.status == EXITED:
        message = f"{cause.text}{waited_for}"
        return Failure(cause.rank, cause.progress.label, message, "", cause.progress.last_seen, False)
    if cause.status == SILENT:
        quiet = max(0.0, now - cause.progress.last_seen)
        message = (
            f"stopped responding: no progress for {quiet:.1f} s{_position(cause.progress)}. If it was only "
            f"slow, raise the collective timeout (now {timeout_s:g} s){waited_for}"
        )
        return Failure(cause.rank, cause.progress.label, message, "", cause.progress.last_seen, True)

    message = cause.text
    if len(behind) == len(unfinished) and len(unfinished) > 1:
        message += (
            f"\nEvery unfinished rank failed in collective #{fewest} ({cause.in_collective}), so no rank "
            f"was behind: the collective itself failed or hung."
        )
        if backend == "nccl":
            # NOTE: advice from NCCL's documented P2P behaviour; not reproduced here (no GPU machine).
            message += (
                " On GPUs that report P2P but cannot use it, NCCL hangs here: run with "
                "NCCL_P2P_DISABLE=1 (compare --no-p2p), and see `python -m moe_lab env`."
            )
    return Failure(cause.rank, cause.phase, message, cause.remote_traceback, cause.reported_at, False)


def _position(progress: RankProgress) -> str:
    if progress.collectives == 0:
        return ", before joining the process group"
    return f", after entering collective #{progress.collectives} ({progress.collective})"


def _waiting_note(waiting: list[RankState], cause: RankState) -> str:
    if not waiting:
        return ""
    first = min(waiting, key=lambda s: s.order)
    where = f"collective #{first.progress.collectives} ({first.in_collective})"
    others = "" if len(waiting) == 1 else f" (and {len(waiting) - 1} more rank(s))"
    return f". Rank {first.rank}{others} waited for it in {where} and failed: {first.text.splitlines()[0]}"
