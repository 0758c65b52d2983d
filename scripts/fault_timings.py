"""Inject each kind of rank failure into a small compare run and print how long the error took.

    python scripts/fault_timings.py [--timeout 4]

Each row is one run of the tiny preset on 2 gloo ranks with MOE_LAB_FAULT set. "to error" is
the time from the failure to the RankError in this process. For a rank that died or hung, it
counts from the rank's last progress update. "run" is the whole call, rank start-up included.
"""

from __future__ import annotations

import argparse
import time

from moe_lab.compare import CompareOptions, run_compare
from moe_lab.environment import inspect_environment
from moe_lab.launch import RankError
from moe_lab.workload import WorkloadSpec

FAULTS = (
    "rank=1,phase=dispatch,kind=raise",
    "rank=1,phase=dispatch,kind=kill",
    "rank=1,phase=dispatch,kind=hang",
    "rank=1,phase=setup,kind=hang",
    "rank=1,phase=result,kind=hang",
)


def time_fault(fault: str, timeout_s: float) -> tuple[str, float, float]:
    options = CompareOptions(
        spec=WorkloadSpec(preset="tiny", tokens=(5, 3)), repeats=1, warmup=0,
        timeout_s=timeout_s, env=(("MOE_LAB_FAULT", fault),),
    )
    started = time.monotonic()
    try:
        run_compare(options)
    except RankError as err:
        return err.args[0].splitlines()[0], time.time() - err.failed_at, time.monotonic() - started
    raise SystemExit(f"no error for {fault}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=4.0, help="collective timeout in seconds (default: %(default)s)")
    args = parser.parse_args()
    machine = inspect_environment()
    print(f"tiny preset, 2 gloo ranks, collective timeout {args.timeout:g} s; {machine.cpu_model}, {machine.cpu_count} cores, torch {machine.torch_version}")
    print(f"{'MOE_LAB_FAULT':<36}{'to error':>10}{'run':>8}  error")
    for fault in FAULTS:
        headline, to_error, run = time_fault(fault, args.timeout)
        print(f"{fault:<36}{to_error:>9.1f}s{run:>7.1f}s  {headline[:100]}")


if __name__ == "__main__":
    main()
