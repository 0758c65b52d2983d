"""What this machine offers the kit: CPUs, GPUs, peer-to-peer (P2P) access, NCCL, and advice.

`inspect_environment` reads the machine into an `EnvironmentReport` of plain data. The
decisions (`choose_backend`, `advise`) are pure functions of that data, so they are tested on
CPU with made-up GPU descriptions.

Background for the target case, two consumer GPUs without NVLink: when the GPUs can read each
other's memory over PCIe, NCCL moves data between them with its P2P transport. Otherwise it goes
through a buffer in host shared memory (its SHM transport), which costs a copy through host RAM. Some consumer boards report P2P that does not work (for example with
the IOMMU or PCIe ACS enabled); NCCL then hangs or returns wrong data unless P2P is disabled
with NCCL_P2P_DISABLE=1.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

BACKENDS = ("auto", "gloo", "nccl")
# NCCL and CUDA variables that change how ranks talk; `env` prints the ones that are set.
NCCL_VARIABLES = ("NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_SHM_DISABLE", "NCCL_DEBUG", "CUDA_VISIBLE_DEVICES")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_bytes: int
    capability: tuple[int, int]  # CUDA compute capability (major, minor)


@dataclass(frozen=True)
class EnvironmentReport:
    cpu_count: int | None
    cpu_model: str
    torch_version: str
    cuda_version: str | None  # CUDA that torch was built with; None for a CPU build
    nccl_available: bool  # torch.distributed has the NCCL backend
    nccl_version: str | None
    gpus: tuple[GpuInfo, ...] = ()
    # p2p[i][j]: torch.cuda.can_device_access_peer(i, j); the diagonal is True.
    p2p: tuple[tuple[bool, ...], ...] = ()
    variables: dict[str, str] = field(default_factory=dict)  # the NCCL_VARIABLES that are set

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BackendChoice:
    backend: str | None  # "gloo" or "nccl"; None when the request cannot be met
    reason: str  # why this backend, or the error message when backend is None


def choose_backend(requested: str, world_size, gpus: int, nccl_available: bool) -> BackendChoice:
    """Pick the backend for `world_size` ranks on a machine with `gpus` visible GPUs.

    NCCL needs one GPU per rank; `auto` takes NCCL when it can and gloo on CPU otherwise.
    """
    if requested not in BACKENDS:
        return BackendChoice(None, f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        return BackendChoice(None, f"world_size must be an integer >= 1, got {world_size!r}")
    nccl_ok = nccl_available and gpus >= world_size
    if requested == "gloo":
        return BackendChoice("gloo", "gloo was requested: ranks run on CPU")
    if requested == "nccl" and not nccl_ok:
        reason = "this torch build has no NCCL" if not nccl_available else f"only {gpus} GPU(s) are visible"
        return BackendChoice(
            None,
            f"backend 'nccl' needs one GPU per rank, {world_size} in all, but {reason}; "
            f"use --backend gloo or --world-size {max(gpus, 1)}",
        )
    if nccl_ok:
        how = "was requested" if requested == "nccl" else "is available"
        return BackendChoice("nccl", f"NCCL {how} and {gpus} GPU(s) are visible: one per rank, cuda:0 to cuda:{world_size - 1}")
    if gpus == 0:
        return BackendChoice("gloo", "no GPU is visible, so ranks run on CPU")
    if not nccl_available:
        return BackendChoice("gloo", f"{gpus} GPU(s) are visible but this torch build has no NCCL, so ranks run on CPU")
    return BackendChoice(
        "gloo", f"{gpus} GPU(s) are visible for {world_size} ranks and NCCL needs one GPU per rank, so ranks run on CPU"
    )


def pairs_without_p2p(report: EnvironmentReport, world_size: int) -> list[tuple[int, int]]:
    """GPU pairs (i < j) among the first `world_size` GPUs where either direction lacks P2P."""
    used = min(world_size, len(report.p2p))
    return [
        (i, j) for i in range(used) for j in range(i + 1, used)
        if not (report.p2p[i][j] and report.p2p[j][i])
    ]


def advise(report: EnvironmentReport, world_size: int) -> list[str]:
    """Advice for running `world_size` ranks on this machine, most important first."""
    choice = choose_backend("auto", world_size, len(report.gpus), report.nccl_available)
    advice = []
    if choice.backend != "nccl":
        if not report.gpus:
            advice.append(
                "No GPU is visible: ranks run on CPU with gloo. Byte counts are exact; times show the "
                "mechanism, not PCIe or NCCL speeds."
            )
        elif len(report.gpus) < world_size:
            advice.append(
                f"{len(report.gpus)} GPU(s) for {world_size} ranks: NCCL needs one GPU per rank, so the kit "
                f"uses gloo on CPU. Use --world-size {len(report.gpus)} to run on the GPUs."
            )
        else:
            advice.append("This torch build has no NCCL: install a CUDA build of torch to run ranks on the GPUs.")
        return advice

    p2p_disabled = report.variables.get("NCCL_P2P_DISABLE", "0") not in ("", "0")
    shm_disabled = report.variables.get("NCCL_SHM_DISABLE", "0") not in ("", "0")
    missing = pairs_without_p2p(report, world_size)
    if world_size < 2:
        advice.append("One rank moves no data between GPUs: use --world-size 2 or more to measure communication.")
    elif p2p_disabled:
        advice.append(
            "NCCL_P2P_DISABLE is set: NCCL does not use P2P and moves data through host shared memory, "
            "as on GPUs without P2P (the target setup)."
        )
    elif len(missing) == world_size * (world_size - 1) // 2:
        advice.append(
            "No P2P between the GPUs the ranks use: this is the target setup. NCCL moves data through host "
            "shared memory (its SHM transport), one copy through host RAM each way."
        )
    elif missing:
        pairs = ", ".join(f"GPU {i}-{j}" for i, j in missing)
        advice.append(
            f"P2P is missing between {pairs} but present between other GPUs: NCCL uses P2P where it can and "
            f"host shared memory elsewhere, so results mix both. Run compare --no-p2p to measure the "
            f"no-P2P setup on every pair."
        )
    else:
        advice.append(
            "The GPUs report P2P: NCCL will use its P2P transport. Run compare --no-p2p (NCCL_P2P_DISABLE=1) "
            "to reproduce the target setup without P2P."
        )
    if world_size >= 2 and not p2p_disabled and len(missing) < world_size * (world_size - 1) // 2:
        advice.append(
            "Some consumer boards report P2P that does not work (for example with the IOMMU or PCIe ACS "
            "enabled): if a run hangs in its first collective or fails its reference check, set "
            "NCCL_P2P_DISABLE=1."
        )
    if world_size >= 2 and shm_disabled and (p2p_disabled or missing):
        advice.append(
            "NCCL_SHM_DISABLE is set too: without P2P or shared memory, NCCL falls back to its network "
            "transport (sockets), which is slower than the target setup. Unset it."
        )
    # NOTE: the transport NCCL really picks is only visible on GPUs; CPU tests cover this logic only.
    advice.append("To see the transport NCCL picks, run with NCCL_DEBUG=INFO and look for 'via P2P' or 'via SHM'.")
    return advice


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inspect_environment() -> EnvironmentReport:
    """Read this machine: CPUs, torch, NCCL, GPUs and their P2P matrix."""
    import torch
    import torch.distributed as dist

    gpus: list[GpuInfo] = []
    p2p: list[tuple[bool, ...]] = []
    nccl_version = None
    if torch.cuda.is_available():
        # NOTE: GPU branch; not run here (no GPU machine was available).
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append(GpuInfo(index, props.name, props.total_memory, (props.major, props.minor)))
        count = len(gpus)
        p2p = [tuple(i == j or torch.cuda.can_device_access_peer(i, j) for j in range(count)) for i in range(count)]
        try:
            nccl_version = ".".join(map(str, torch.cuda.nccl.version()))
        except (AttributeError, RuntimeError):
            nccl_version = None
    return EnvironmentReport(
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        nccl_available=dist.is_available() and dist.is_nccl_available(),
        nccl_version=nccl_version,
        gpus=tuple(gpus),
        p2p=tuple(p2p),
        variables={name: os.environ[name] for name in NCCL_VARIABLES if name in os.environ},
    )


def format_p2p(report: EnvironmentReport) -> list[str]:
    if not report.gpus:
        return ["P2P: no GPU"]
    lines = ["P2P (torch.cuda.can_device_access_peer, row GPU reads column GPU):"]
    lines.append("      " + "".join(f"{f'GPU{gpu.index}':>6}" for gpu in report.gpus))
    for i, row in enumerate(report.p2p):
        cells = "".join(f"{'-' if i == j else ('yes' if ok else 'no'):>6}" for j, ok in enumerate(row))
        lines.append(f"{f'GPU{i}':<6}{cells}")
    return lines


def format_report(report: EnvironmentReport, world_size: int) -> str:
    choice = choose_backend("auto", world_size, len(report.gpus), report.nccl_available)
    nccl = report.nccl_version or ("available" if report.nccl_available else "not in this torch build")
    lines = [
        f"CPU: {report.cpu_count} cores, {report.cpu_model}",
        f"torch {report.torch_version}, CUDA {report.cuda_version or 'none (CPU build)'}, NCCL {nccl}",
    ]
    if report.gpus:
        for gpu in report.gpus:
            lines.append(
                f"GPU{gpu.index}: {gpu.name}, {gpu.memory_bytes / 2**30:.1f} GiB, "
                f"compute capability {gpu.capability[0]}.{gpu.capability[1]}"
            )
    else:
        lines.append("GPUs: none visible")
    lines += format_p2p(report)
    variables = ", ".join(f"{name}={value}" for name, value in report.variables.items()) or "none set"
    lines.append(f"NCCL/CUDA variables: {variables}")
    lines.append(f"backend for {world_size} ranks (--backend auto): {choice.backend}, because {choice.reason}")
    lines.append("advice:")
    lines += [f"  - {line}" for line in advise(report, world_size)]
    return "\n".join(lines)
