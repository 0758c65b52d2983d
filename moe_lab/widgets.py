"""The interactive explorer: bytes and predicted time per path as the shape and the link change.

Moving a control only evaluates the byte model and the cost model, which takes well under a
second. Measuring on real ranks runs only when the button is pressed. Drawing uses plain
matplotlib figures, so it works with the inline backend.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from .bytes_model import path_transfers, per_rank_by_phase
from .compare import CompareOptions, Variant, run_compare
from .costmodel import LINK_PRESETS, CalibrationError, Link, predict, resolve_link
from .paths import PATHS, PathOptions
from .workload import WorkloadSpec, build_workload

TOKEN_CHOICES = (1, 4, 16, 64, 128, 256, 512, 1024, 2048)
REFERENCE_DIR = Path("data/reference")
VARIANTS = tuple(Variant(name) for name in PATHS) + (
    Variant("alltoall_dedup", PathOptions(dispatch_dtype="fp8")),
)


@dataclass(frozen=True)
class Settings:
    """One position of the explorer's controls."""

    tokens: int = 128  # per rank
    world_size: int = 2
    top_k: int = 6
    locality: float = 0.5  # share of each token's experts on its own rank
    dtype: str = "bfloat16"
    link: str = "rtx3090-pcie4-shm"
    preset: str = "deepseek-v2-lite"

    def spec(self) -> WorkloadSpec:
        return WorkloadSpec(
            preset=self.preset, world_size=self.world_size, tokens=self.tokens, routing="local",
            locality=self.locality, dtype=self.dtype, top_k=self.top_k,
        )


def available_links(data_dir: Path = REFERENCE_DIR, world_size: int = 2) -> list[str]:
    """List the link presets, and this machine's calibration when `data_dir` has one for `world_size`."""
    links = list(LINK_PRESETS)
    if (Path(data_dir) / f"collectives-gloo-{world_size}r.json").is_file():
        links.append("this-machine")
    return links


def load_link(settings: Settings, data_dir: Path = REFERENCE_DIR) -> Link:
    return resolve_link(settings.link, "gloo", settings.world_size, Path(data_dir))


def model_rows(settings: Settings, data_dir: Path = REFERENCE_DIR) -> list[dict]:
    """Model each variant: bytes the busiest rank sends, and predicted communication and compute time."""
    workload = build_workload(settings.spec())
    link = load_link(settings, data_dir)
    rows = []
    for variant in VARIANTS:
        transfers = path_transfers(variant.path, workload, link.backend, variant.options)
        sent = per_rank_by_phase(transfers, workload.world_size, "sent")
        prediction = predict(variant.path, workload, link, variant.options)
        rows.append({
            "path": variant.label,
            "sent_bytes": max(sum(rank.values()) for rank in sent),
            "predicted_comm_ms": prediction.comm_seconds * 1e3,
            "predicted_compute_ms": prediction.compute_seconds * 1e3,
        })
    return rows


def measured_points(settings: Settings, data_dir: Path = REFERENCE_DIR) -> dict[str, dict]:
    """Return the reference sweep's rows at these settings, by path (empty when it has no such point)."""
    sweep = Path(data_dir) / "sweep.csv"
    if not sweep.is_file():
        return {}
    points = {}
    with sweep.open() as f:
        for row in csv.DictReader(f):
            same = (
                row.get("world_size") == str(settings.world_size)
                and row.get("tokens") == str(settings.tokens)
                and row.get("dtype") == settings.dtype
                and row.get("routing") == "local"
                and _close(row.get("locality"), settings.locality)
                and row.get("top_k") == str(settings.top_k)
            )
            if same:
                points[row["path"]] = row
    return points


def _close(value: str | None, target: float) -> bool:
    try:
        return value is not None and math.isclose(float(value), target, abs_tol=5e-3)
    except ValueError:
        return False


def draw(settings: Settings, data_dir: Path = REFERENCE_DIR, measured: dict[str, dict] | None = None):
    """Draw bytes and predicted time per path, with measured points overlaid where they exist."""
    rows = model_rows(settings, data_dir)
    measured = measured_points(settings, data_dir) if measured is None else measured
    link = load_link(settings, data_dir)
    names = [row["path"] for row in rows]
    fig, (bytes_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 3.6))

    bytes_ax.barh(names, [row["sent_bytes"] / 2**20 for row in rows], color="#1f77b4")
    for index, name in enumerate(names):
        if name in measured and measured[name].get("sent_total_bytes"):
            bytes_ax.plot(float(measured[name]["sent_total_bytes"]) / 2**20, index, "k*", markersize=9)
    bytes_ax.set_xlabel("MiB sent by the busiest rank per layer (model; * measured)")
    bytes_ax.invert_yaxis()

    comm = [row["predicted_comm_ms"] for row in rows]
    compute = [row["predicted_compute_ms"] for row in rows]
    time_ax.barh(names, comm, color="#d62728", label="communication (predicted)")
    time_ax.barh(names, compute, left=comm, color="#bbbbbb", label="expert compute (predicted)")
    for index, name in enumerate(names):
        if name in measured and measured[name].get("comm_ms"):
            time_ax.plot(float(measured[name]["comm_ms"]), index, "k*", markersize=9)
    time_ax.set_yticks([])
    time_ax.invert_yaxis()
    time_ax.set_xlabel("ms per layer (* measured communication on this machine)")
    time_ax.legend(fontsize=7, loc="lower right")
    kind = "an estimate" if link.estimate else "calibrated"
    fig.suptitle(
        f"{settings.tokens} tokens per rank, {settings.world_size} ranks, top-{settings.top_k}, locality "
        f"{settings.locality:.2f}, {settings.dtype}; link {link.name} ({kind})", fontsize=9,
    )
    fig.tight_layout()
    return fig


def measure(settings: Settings, repeats: int = 3) -> dict[str, dict]:
    """Run the paths at these settings on real gloo ranks; returns points in the form `draw` overlays."""
    result = run_compare(CompareOptions(spec=settings.spec(), repeats=repeats, backend="gloo", dispatch_dtypes=("fp8",)))
    points = {}
    for path in result.paths:
        sent = [sum(value for value in path.bytes_by_phase(rank).values() if value) for rank in range(len(path.records))]
        points[path.path] = {"sent_total_bytes": max(sent), "comm_ms": path.comm_spread().median * 1e3}
    return points


def explorer(data_dir: Path = REFERENCE_DIR):
    """Build the explorer's controls and its output; display the returned widget in a notebook."""
    import ipywidgets as widgets
    from IPython.display import display

    defaults = Settings()
    controls = {
        "tokens": widgets.SelectionSlider(options=TOKEN_CHOICES, value=defaults.tokens, description="tokens/rank"),
        "world_size": widgets.Dropdown(options=(2, 4, 8), value=defaults.world_size, description="ranks"),
        "top_k": widgets.IntSlider(min=1, max=8, value=defaults.top_k, description="top-k"),
        "locality": widgets.FloatSlider(min=0.0, max=1.0, step=0.05, value=defaults.locality, description="locality"),
        "dtype": widgets.Dropdown(options=("float32", "bfloat16"), value=defaults.dtype, description="dtype"),
        "link": widgets.Dropdown(options=available_links(data_dir), value=defaults.link, description="link"),
    }
    button = widgets.Button(description="Measure on real ranks", tooltip="runs every path on gloo ranks: seconds to minutes")
    status = widgets.Label()
    output = widgets.Output()
    measured: dict[str, dict] = {}

    def settings() -> Settings:
        return Settings(**{name: control.value for name, control in controls.items()})

    def redraw(_=None, extra: dict | None = None):
        with output:
            output.clear_output(wait=True)
            try:
                figure = draw(settings(), data_dir, measured=extra or measured_points(settings(), data_dir))
            except (CalibrationError, ValueError) as err:  # an impossible combination, e.g. locality for 8 ranks
                print(f"cannot draw these settings: {err}")
                return
            display(figure)
            plt.close(figure)

    def on_measure(_):
        status.value = "measuring on real ranks..."
        try:
            points = measure(settings())
        except (ValueError, RuntimeError) as err:
            status.value = f"measurement failed: {err}"
            return
        measured.clear()
        measured.update(points)
        status.value = "measured points (*) are from this run"
        redraw(extra=points)

    for control in controls.values():
        control.observe(lambda change: (measured.clear(), redraw()), names="value")
    button.on_click(on_measure)
    redraw()
    return widgets.VBox([widgets.HBox(list(controls.values())[:3]), widgets.HBox(list(controls.values())[3:]),
                         widgets.HBox([button, status]), output])
