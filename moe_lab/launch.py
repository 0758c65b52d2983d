"""Starting ranks: spawned processes on one machine, or the current process under torchrun.

`run_ranks` starts `world_size` processes, joins them into one process group through a
TCPStore that the parent holds (so the port is chosen by the OS and never raced for), runs
`fn(ctx, *args)` in each and returns the results in rank order. If any rank raises or dies, it
stops every other rank at once and raises one `RankError` that names the failing rank, its
phase and its original traceback; no child process outlives the call.
"""

from __future__ import annotations

from .errors import InputError

import ctypes
import io
import logging
import os
import queue
import signal
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
DEFAULT_TIMEOUT_S = 60.0  # collective timeout: long enough for a 2-core CPU layer, short enough to fail fast
LOCALHOST = "127.0.0.1"


class LaunchError(InputError):
    """Ranks cannot be started as asked (backend, world size, devices)."""


class RankError(RuntimeError):
    """A rank failed; carries the rank, the phase it was in and its traceback."""

    def __init__(self, rank: int, phase: str, message: str, remote_traceback: str = ""):
        self.rank, self.phase, self.remote_traceback = rank, phase, remote_traceback
        text = f"rank {rank} failed in phase {phase!r}: {message}"
        if remote_traceback:
            text += f"\n\n--- traceback of rank {rank} ---\n{remote_traceback.rstrip()}"
        super().__init__(text)


@dataclass(frozen=True)
class RankContext:
    """What a rank function gets: who it is and where its tensors live."""

    rank: int
    world_size: int
    backend: str
    device: torch.device


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_backend(backend: str, world_size: int) -> str:
    """Pick gloo or nccl; nccl needs one GPU per rank on this machine."""
    if backend not in BACKENDS:
        raise LaunchError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(world_size, int) or world_size < 1:
        raise LaunchError(f"world_size must be an integer >= 1, got {world_size!r}")
    gpus = gpu_count()
    nccl_ok = dist.is_nccl_available() and gpus >= world_size
    if backend == "auto":
        return "nccl" if nccl_ok else "gloo"
    if backend == "nccl" and not nccl_ok:
        reason = "this torch build has no NCCL" if not dist.is_nccl_available() else f"only {gpus} GPU(s) are visible"
        raise LaunchError(
            f"backend 'nccl' needs one GPU per rank, {world_size} in all, but {reason}; "
            f"use --backend gloo or --world-size {max(gpus, 1)}"
        )
    return backend


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


def failed_phase(err: BaseException) -> str:
    return getattr(err, "moe_lab_phase", None) or "setup"


def _rank_main(fn, args, rank, world_size, backend, store_port, timeout_s, env, results) -> None:
    _die_with_parent()
    os.environ.update(env)
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            # NOTE: written for one GPU per rank; not run here (no GPU machine was available).
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        store = dist.TCPStore(LOCALHOST, store_port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        value = fn(RankContext(rank, world_size, backend, device), *args)
        results.put(("ok", rank, _encode(value)))
    except BaseException as err:  # report everything, KeyboardInterrupt included, then exit
        results.put(("error", rank, failed_phase(err), f"{type(err).__name__}: {err}", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 3.0
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


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
    are started with the spawn method. `timeout_s` bounds every collective.
    """
    backend = resolve_backend(backend, world_size)
    if not timeout_s > 0:
        raise LaunchError(f"timeout must be > 0 seconds, got {timeout_s!r}")
    context = torch_mp.get_context("spawn")
    results = context.Queue()
    # The parent owns the store: port 0 lets the OS pick a free port, with no race between runs.
    store = dist.TCPStore(LOCALHOST, 0, world_size + 1, is_master=True, wait_for_workers=False)
    processes = [
        context.Process(
            target=_rank_main,
            args=(fn, args, rank, world_size, backend, store.port, timeout_s, dict(env or {}), results),
            daemon=True,
            name=f"moe_lab-rank{rank}",
        )
        for rank in range(world_size)
    ]
    values: dict[int, object] = {}
    try:
        for process in processes:
            process.start()
        exited_at: dict[int, float] = {}
        while len(values) < world_size:
            try:
                message = results.get(timeout=0.1)
            except queue.Empty:
                message = None
            if message is not None:
                if message[0] == "error":
                    _, rank, phase, text, remote_traceback = message
                    raise RankError(rank, phase, text, remote_traceback)
                _, rank, payload = message
                values[rank] = _decode(payload)
                continue
            for rank, process in enumerate(processes):
                if rank in values or process.exitcode is None:
                    continue
                # A clean exit may still have its result in the pipe: give it a moment.
                first_seen = exited_at.setdefault(rank, time.monotonic())
                if process.exitcode != 0 or time.monotonic() - first_seen > 2.0:
                    raise RankError(rank, "unknown", _exit_reason(process.exitcode))
        return [values[rank] for rank in range(world_size)]
    finally:
        _stop(processes)
        results.close()
        del store


def under_torchrun() -> bool:
    """True when this process was started by torchrun (env:// rendezvous variables are set)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def run_torchrun_rank(fn, args: tuple = (), backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S):
    """Run `fn` as this torchrun rank; rank 0 returns every rank's result, the others None."""
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend == "auto":
        backend = "nccl" if dist.is_nccl_available() and gpu_count() > local_rank else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        # NOTE: written for one GPU per local rank; not run here (no GPU machine was available).
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    try:
        value = fn(RankContext(rank, world_size, backend, device), *args)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(value, gathered, dst=0)
        return gathered
    finally:
        dist.destroy_process_group()
