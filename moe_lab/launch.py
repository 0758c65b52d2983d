"""Starting ranks: spawned processes on one machine, or the current process under torchrun.

`run_ranks` starts `world_size` processes, joins them into one process group through a
TCPStore that the parent holds (so the port is chosen by the OS and never raced for), runs
`fn(ctx, *args)` in each and returns the results in rank order.

If any rank raises, dies or stops responding, it stops every other rank and raises one
`RankError`. The error names the rank that caused the failure and its phase, with its original
traceback, or for a rank that stopped responding, its stack when it was stopped. No child
process outlives the call, Ctrl-C included. Each rank publishes its progress to shared memory
(see `monitor`), so the launcher can tell the rank that hung from the rank that timed out
waiting for it.
"""

from __future__ import annotations

import ctypes
import faulthandler
import io
import logging
import math
import os
import shutil
import signal
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from .environment import BACKENDS, choose_backend
from .errors import InputError
from .faults import check_fault_rank, fault_from_environment
from .monitor import (
    ERROR,
    EXITED,
    OK,
    SILENT,
    Failure,
    ProgressBoard,
    RankMonitor,
    RankState,
    find_failure,
    mark_collective_error,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0  # collective timeout: long enough for a 2-core CPU layer, short enough to fail fast
LOCALHOST = "127.0.0.1"
POLL_S = 0.2  # how often the launcher checks progress when no rank reports
GRACE_S = 1.5  # after a first failure, how long to wait for the other ranks' reports before deciding
WATCHDOG_MARGIN_S = 5.0  # a rank silent for timeout + this, after another rank finished, has hung
STACK_WAIT_S = 1.0  # how long to wait for a hung rank to write its stack


class LaunchError(InputError):
    """Ranks cannot be started as asked (backend, world size, devices)."""


class RankError(RuntimeError):
    """A rank failed; carries the rank, the phase it was in and its traceback.

    `failed_at` is the time.time() of the failure, or for a rank that died or stopped responding,
    of its last progress update. `stack` is the Python stack of a rank that stopped responding,
    dumped just before it was stopped.
    """

    def __init__(
        self, rank: int, phase: str, message: str, remote_traceback: str = "",
        failed_at: float | None = None, stack: str = "",
    ):
        self.rank, self.phase, self.remote_traceback = rank, phase, remote_traceback
        self.failed_at = time.time() if failed_at is None else failed_at
        self.stack = stack
        text = f"rank {rank} failed in phase {phase!r}: {message}"
        if remote_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{remote_traceback.rstrip()}"
        if stack:
            text += f"\n\n--- stack of rank {rank} when it was stopped ---\n{stack.rstrip()}"
        super().__init__(text)


@dataclass(frozen=True)
class RankContext:
    """The context a rank function receives: its rank, the world size, the backend and its device."""

    rank: int
    world_size: int
    backend: str
    device: torch.device
    monitor: RankMonitor | None = None  # progress publishing and fault injection; pass it to RecordingComm


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(backend: str, world_size: int) -> str:
    """Pick gloo or nccl; nccl needs one GPU per rank on this machine."""
    choice = choose_backend(backend, world_size, gpu_count(), dist.is_nccl_available())
    if choice.backend is None:
        raise LaunchError(choice.reason)
    return choice.backend


def check_timeout(timeout_s) -> None:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (math.isfinite(timeout_s) and timeout_s > 0):
        raise LaunchError(f"timeout must be a finite number of seconds > 0, got {timeout_s!r}")


def _die_with_parent() -> None:
    """Ask Linux to kill this process if the parent dies, so no rank is orphaned."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _encode(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _decode(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def failed_phase(err: BaseException, default: str = "setup") -> str:
    return getattr(err, "moe_lab_phase", None) or default


def _join_group(rank, world_size, backend, store_port, timeout_s, monitor: RankMonitor) -> None:
    monitor.enter_collective("init_process_group")
    try:
        store = dist.TCPStore(LOCALHOST, store_port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    except BaseException as err:
        mark_collective_error(err, "init_process_group")
        raise


def _rank_main(fn, args, rank, world_size, backend, store_port, timeout_s, env, conn, board, stack_path) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the launcher, which stops every rank
    os.environ.update(env)
    stack_file = open(stack_path, "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)  # the launcher requests it when the rank hangs
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    monitor = RankMonitor(rank, board, fault_from_environment())
    try:
        monitor.enter_phase("setup")
        device = torch.device("cpu")
        if backend == "nccl":
            # NOTE: written for one GPU per rank; not run here (no GPU machine was available).
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        _join_group(rank, world_size, backend, store_port, timeout_s, monitor)
        monitor.stage = "run"
        monitor.exit_phase()  # publishes "run"
        value = fn(RankContext(rank, world_size, backend, device, monitor), *args)
        monitor.set_path(None)
        monitor.enter_phase("result")
        conn.send((OK, rank, _encode(value)))
    except BaseException as err:  # report everything, KeyboardInterrupt included, then exit
        phase = failed_phase(err, monitor.label)
        conn.send((
            ERROR, rank, phase, f"{type(err).__name__}: {err}", traceback.format_exc(),
            getattr(err, "moe_lab_collective", None), time.time(),
        ))
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _sigint_ignored():
    """Ignore SIGINT while ranks start, so they inherit SIG_IGN and a terminal's Ctrl-C reaches only the launcher.

    Python keeps an inherited SIG_IGN, so a rank still importing torch is not interrupted. A
    Ctrl-C in this short window is lost. From other threads the handler cannot change.
    """
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(processes) -> None:
    """Stop every started rank: SIGTERM, then SIGKILL after 3 s. A Ctrl-C meanwhile waits until they are gone."""
    interrupts = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
    except ValueError:  # not the main thread: signal handlers cannot be changed here
        previous = None
    try:
        started = [process for process in processes if process.pid is not None]
        for process in started:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 3.0
        for process in started:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if interrupts and callable(previous):
                previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by signal {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode} without a result"


def run_ranks(
    fn,
    args: tuple = (),
    world_size: int = 2,
    backend: str = "auto",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> list:
    """Run `fn(ctx, *args)` on `world_size` spawned ranks and return their results in rank order.

    `fn` must be importable by name (defined in a module, not in a notebook cell), because ranks
    are started with the spawn method. `timeout_s` bounds every collective. `env` adds
    environment variables for the ranks. A failure raises `RankError` within about
    `timeout_s` + 5 s of the failing rank's last sign of life.
    """
    backend = resolve_backend(backend, world_size)
    check_timeout(timeout_s)
    rank_env = {str(key): str(value) for key, value in (env or {}).items()}
    check_fault_rank(fault_from_environment({**os.environ, **rank_env}), world_size)

    context = torch_mp.get_context("spawn")
    board = ProgressBoard(context, world_size)
    # The parent owns the store: port 0 lets the OS pick a free port, with no race between runs.
    store = dist.TCPStore(LOCALHOST, 0, world_size + 1, is_master=True, wait_for_workers=False)
    stack_dir = tempfile.mkdtemp(prefix="moe_lab-stacks-")
    pipes = [context.Pipe(duplex=False) for _ in range(world_size)]  # (reader, writer) per rank
    processes = [
        context.Process(
            target=_rank_main,
            args=(fn, args, rank, world_size, backend, store.port, timeout_s, rank_env, pipes[rank][1], board,
                  os.path.join(stack_dir, f"rank{rank}.stack")),
            daemon=True,
            name=f"moe_lab-rank{rank}",
        )
        for rank in range(world_size)
    ]
    try:
        with _sigint_ignored():
            for process in processes:
                process.start()
        for _, writer in pipes:
            writer.close()  # the ranks hold the writing ends: a rank's exit then reads as end of file
        return _collect(processes, [reader for reader, _ in pipes], board, timeout_s, backend, stack_dir)
    finally:
        _stop(processes)
        for reader, writer in pipes:
            reader.close()
            writer.close()
        shutil.rmtree(stack_dir, ignore_errors=True)
        del store


def _receive(reader):
    """Return the next message from a rank's pipe, or None if there is none yet or the pipe is closed."""
    try:
        if reader.poll():
            return reader.recv()
    except (EOFError, OSError):
        pass
    return None


def _collect(processes, readers, board: ProgressBoard, timeout_s: float, backend: str, stack_dir: str) -> list:
    """Wait for every rank's result; on a failure, decide which rank caused it and raise RankError."""
    world_size = len(processes)
    states = [RankState(rank) for rank in range(world_size)]
    values: dict[int, object] = {}
    arrivals = 0
    first_failure = None  # time.monotonic() of the first error, exit or watchdog hit
    while True:
        waiting = [rank for rank in range(world_size) if states[rank].status == SILENT]
        wait([readers[rank] for rank in waiting] + [processes[rank].sentinel for rank in waiting], timeout=POLL_S)
        for rank in waiting:
            state = states[rank]
            message = _receive(readers[rank])
            if message is None and processes[rank].exitcode is not None:
                message = _receive(readers[rank])  # written just before the exit
                if message is None:
                    arrivals += 1
                    state.status, state.order = EXITED, arrivals
                    state.text, state.reported_at = _exit_reason(processes[rank].exitcode), time.time()
                    continue
            if message is None:
                continue
            if message[0] == OK:
                state.status = OK
                values[rank] = _decode(message[2])
            else:
                arrivals += 1
                _, _, state.phase, state.text, state.remote_traceback, state.in_collective, state.reported_at = message
                state.status, state.order = ERROR, arrivals

        if len(values) == world_size:
            return [values[rank] for rank in range(world_size)]
        for state in states:
            state.progress = board.read(state.rank)
        if first_failure is None and (any(s.status in (ERROR, EXITED) for s in states) or _hung(states, timeout_s)):
            first_failure = time.monotonic()
        if first_failure is not None and _ready_to_decide(states, timeout_s, time.monotonic() - first_failure):
            _raise_failure(find_failure(states, timeout_s, time.time(), backend), processes, stack_dir)


def _ready_to_decide(states: list[RankState], timeout_s: float, since_failure: float) -> bool:
    """Return whether waiting longer for the silent ranks could still change the verdict."""
    if any(s.status == ERROR and s.in_collective is None for s in states):
        return True  # an exception outside a collective is the cause
    silent = [s for s in states if s.status == SILENT]
    quiet_for = [time.time() - s.progress.last_seen for s in silent]
    # Ranks silent for a whole timeout will not speak now: the rank waiting for them just timed out.
    return since_failure > GRACE_S or all(seconds >= timeout_s for seconds in quiet_for) or _hung(states, timeout_s)


def _hung(states: list[RankState], timeout_s: float) -> bool:
    """Watchdog: some rank finished, and every unfinished one has been silent past the collective timeout.

    No collective timeout can fire then, because the finished ranks no longer wait for anyone.
    """
    silent = [s for s in states if s.status == SILENT]
    limit = time.time() - timeout_s - WATCHDOG_MARGIN_S
    return any(s.status == OK for s in states) and bool(silent) and all(s.progress.last_seen < limit for s in silent)


def _raise_failure(failure: Failure, processes, stack_dir: str) -> None:
    stack = _dump_stack(processes[failure.rank], os.path.join(stack_dir, f"rank{failure.rank}.stack")) if failure.silent else ""
    raise RankError(failure.rank, failure.phase, failure.message, failure.remote_traceback, failure.failed_at, stack)


def _dump_stack(process, path: str) -> str:
    """Request the Python stack of a rank that stopped responding (faulthandler on SIGUSR1)."""
    if not process.is_alive():
        return ""
    try:
        os.kill(process.pid, signal.SIGUSR1)
    except ProcessLookupError:
        return ""
    deadline = time.monotonic() + STACK_WAIT_S
    previous = text = ""
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            return ""
        if text and text == previous:  # the dump stopped growing
            break
        previous = text
    return text


def under_torchrun() -> bool:
    """True when this process was started by torchrun (env:// rendezvous variables are set)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_torchrun_rank(
    fn, args: tuple = (), backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, env: dict[str, str] | None = None,
):
    """Run `fn` as this torchrun rank; rank 0 returns every rank's result, the others None.

    torchrun itself stops the other ranks when one fails. `env` is set in this process before
    the process group starts, as `run_ranks` does for its ranks.
    """
    check_timeout(timeout_s)
    os.environ.update({str(key): str(value) for key, value in (env or {}).items()})
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    fault = fault_from_environment()
    check_fault_rank(fault, world_size)
    if backend not in BACKENDS:
        raise LaunchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "nccl" if dist.is_nccl_available() and gpu_count() > local_rank else "gloo"
    if backend == "nccl" and gpu_count() <= local_rank:
        raise LaunchError(
            f"backend 'nccl' needs one GPU per local rank, but local rank {local_rank} sees only "
            f"{gpu_count()} GPU(s); start fewer ranks per node or use --backend gloo"
        )
    device = torch.device("cpu")
    if backend == "nccl":
        # NOTE: written for one GPU per local rank; not run here (no GPU machine was available).
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        value = fn(RankContext(rank, world_size, backend, device, RankMonitor(rank, fault=fault)), *args)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
    finally:
        dist.destroy_process_group()
