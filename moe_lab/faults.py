"""Fault injection: make one rank raise, die or hang at a chosen phase, on purpose.

Tests use it to check that a failing rank ends the whole run quickly with one clear error, and
a workshop can use it to show what each failure looks like. Set the environment variable
before starting a run (the ranks inherit it):

    MOE_LAB_FAULT="rank=1,phase=dispatch,kind=raise" python -m moe_lab compare --preset tiny

Keys, comma-separated:
    rank      the rank that fails (required)
    phase     where it fails (required): `setup` (before the rank joins the process group),
              `metadata`, `dispatch`, `compute` or `combine` (on entering that phase of a
              path), or `result` (after the rank's work, before it sends its result)
    kind      `raise` (an `InjectedFault` exception), `kill` (the rank sends itself SIGKILL)
              or `hang` (the rank sleeps and stops responding) (required)
    path      only fail in this path, e.g. `alltoall` (default: the first path that runs)
    seconds   for `hang`: how long to sleep (default: until the launcher stops the rank)

The fault fires once, on the first entry into a matching phase.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass

from .errors import InputError

log = logging.getLogger(__name__)

FAULT_ENV = "MOE_LAB_FAULT"
FAULT_PHASES = ("setup", "metadata", "dispatch", "compute", "combine", "result")
FAULT_KINDS = ("raise", "kill", "hang")
_KEYS = ("rank", "phase", "kind", "path", "seconds")


class FaultSpecError(InputError):
    """An invalid MOE_LAB_FAULT value."""


class InjectedFault(RuntimeError):
    """The exception a `kind=raise` fault raises."""


@dataclass(frozen=True)
class FaultSpec:
    rank: int
    phase: str
    kind: str
    path: str | None = None
    seconds: float | None = None  # hang length; None hangs until the rank is stopped

    def matches(self, rank: int, phase: str, path: str | None) -> bool:
        return rank == self.rank and phase == self.phase and (self.path is None or path == self.path)

    def describe(self) -> str:
        text = f"rank={self.rank},phase={self.phase},kind={self.kind}"
        if self.path is not None:
            text += f",path={self.path}"
        if self.seconds is not None:
            text += f",seconds={self.seconds:g}"
        return text


def parse_fault(text: str | None) -> FaultSpec | None:
    """Parse a MOE_LAB_FAULT value; None or an empty string means no fault."""
    if text is None or not text.strip():
        return None
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in _KEYS or not value:
            raise FaultSpecError(
                f"{FAULT_ENV}={text!r}: invalid item {item.strip()!r}; give key=value pairs with keys "
                f"{', '.join(_KEYS)}, e.g. rank=1,phase=dispatch,kind=raise"
            )
        fields[key] = value

    missing = [key for key in ("rank", "phase", "kind") if key not in fields]
    if missing:
        raise FaultSpecError(f"{FAULT_ENV}={text!r} is missing {', '.join(missing)}; e.g. rank=1,phase=dispatch,kind=raise")

    try:
        rank = int(fields["rank"])
    except ValueError:
        raise FaultSpecError(f"{FAULT_ENV}: rank must be an integer >= 0, got {fields['rank']!r}") from None
    if rank < 0:
        raise FaultSpecError(f"{FAULT_ENV}: rank must be an integer >= 0, got {rank}")
    if fields["phase"] not in FAULT_PHASES:
        raise FaultSpecError(f"{FAULT_ENV}: unknown phase {fields['phase']!r}; choose one of {', '.join(FAULT_PHASES)}")
    if fields["kind"] not in FAULT_KINDS:
        raise FaultSpecError(f"{FAULT_ENV}: unknown kind {fields['kind']!r}; choose one of {', '.join(FAULT_KINDS)}")

    seconds = None
    if "seconds" in fields:
        try:
            seconds = float(fields["seconds"])
        except ValueError:
            seconds = math.nan
        if fields["kind"] != "hang" or not (math.isfinite(seconds) and seconds >= 0):
            raise FaultSpecError(
                f"{FAULT_ENV}: seconds={fields['seconds']!r} is invalid; it sets how long kind=hang sleeps "
                f"and must be a number >= 0"
            )
    return FaultSpec(rank, fields["phase"], fields["kind"], fields.get("path"), seconds)


def fault_from_environment(env: dict[str, str] | None = None) -> FaultSpec | None:
    """Return the fault that MOE_LAB_FAULT in `env` (default: this process's environment) requests."""
    return parse_fault((os.environ if env is None else env).get(FAULT_ENV))


def check_fault_rank(fault: FaultSpec | None, world_size: int) -> None:
    if fault is not None and fault.rank >= world_size:
        raise FaultSpecError(
            f"{FAULT_ENV}: rank={fault.rank} does not exist in a run of {world_size} ranks; "
            f"choose a rank from 0 to {world_size - 1}"
        )


def inject(fault: FaultSpec, label: str) -> None:
    """Carry out `fault` in this process; `label` names where it fires (path/phase)."""
    log.warning("rank %d: injecting fault %s at %s", fault.rank, fault.describe(), label)
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault {fault.describe()} at {label}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.seconds is not None:
        time.sleep(fault.seconds)
        return
    while True:  # hang until the launcher stops this process
        time.sleep(3600)
