"""Routing traces: what a real model's gates chose on real text, stored to replay on the paths.

A trace is one safetensors file (`python -m moe_lab trace` writes them under `data/traces/`).
For T tokens, k experts per token and hidden size H it contains these tensors:

    input_ids                  (T,) int64     the tokens, every sequence one after another
    layers.L.topk_ids          (T, k) int64   for each MoE layer L: each token's experts, in the
                                              order the model's gate returned them
    layers.L.topk_weights      (T, k) float32 their routing weights, routed_scaling_factor included
    layers.L.hidden_states     (T, H)         optional, for one or more layers: the MoE layer's
                                              input (the gate's input), in the model's dtype

and in the safetensors header metadata two strings: `format` = "moe_lab.trace" and `trace`,
a JSON object with
    version                    1
    moe_config                 the MoE shape (`MoEConfig` fields), so a trace replays on its own
    moe_layers                 layers with routing, ascending; hidden_state_layers likewise
    n_tokens, sequence_lengths the tokens per sequence (sequences are the text's paragraphs)
    checkpoint                 {name, revision, path}: which snapshot produced the trace
    text                       {file, sha256, characters} of the input text
    model_dtype                dtype the model ran in, for example "bfloat16"
    gate_check                 per layer: tokens whose experts moe_lab's own gate, run on the
                               recorded gate input, chose differently, and the largest weight
                               difference
    versions                   moe_lab, torch and transformers versions, and the creation time

Replaying (`compare --routing-file TRACE`) takes one layer's routing and splits the tokens over
the ranks as a serving engine splits a batch: contiguous blocks in token order, the first
T mod W ranks one token larger. With `--checkpoint` the experts are the checkpoint's; the
trace's recorded hidden states are the tokens when it has them for that layer, otherwise
tokens are drawn from the seed.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .config import MoEConfig
from .errors import InputError

TRACE_FORMAT = "moe_lab.trace"
TRACE_VERSION = 1


class TraceError(InputError):
    """A trace file that is missing, malformed, or does not fit the run asked for."""


@dataclass
class Trace:
    """A whole trace in memory."""

    metadata: dict
    input_ids: torch.Tensor  # (T,)
    topk_ids: dict[int, torch.Tensor]  # layer -> (T, k)
    topk_weights: dict[int, torch.Tensor]  # layer -> (T, k)
    hidden_states: dict[int, torch.Tensor]  # layer -> (T, H), only for recorded layers

    @property
    def cfg(self) -> MoEConfig:
        return moe_config_from_dict(self.metadata["moe_config"])

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self.topk_ids)


def moe_config_from_dict(data: dict) -> MoEConfig:
    known = {f.name for f in fields(MoEConfig)}
    return MoEConfig(**{key: value for key, value in data.items() if key in known})


def split_tokens(total: int, world_size: int) -> list[int]:
    """Contiguous blocks per rank, the first `total % world_size` ranks one token larger."""
    base, extra = divmod(total, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


# ---- writing ----


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` to `path` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {**trace.metadata, "version": TRACE_VERSION}
    metadata["moe_layers"] = trace.moe_layers
    metadata["hidden_state_layers"] = sorted(trace.hidden_states)
    metadata["n_tokens"] = trace.n_tokens
    tensors = {"input_ids": trace.input_ids.long().contiguous()}
    for layer in trace.moe_layers:
        tensors[f"layers.{layer}.topk_ids"] = trace.topk_ids[layer].long().contiguous()
        tensors[f"layers.{layer}.topk_weights"] = trace.topk_weights[layer].float().contiguous()
    for layer, hidden in trace.hidden_states.items():
        tensors[f"layers.{layer}.hidden_states"] = hidden.contiguous()

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata={"format": TRACE_FORMAT, "trace": json.dumps(metadata)})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


# ---- reading ----


def is_trace_file(path: str | Path) -> bool:
    """True for a safetensors file: an 8-byte little-endian header size, then a JSON header."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        start = f.read(9)
    if len(start) < 9 or start[8:9] != b"{":
        return False
    (header_size,) = struct.unpack("<Q", start[:8])
    return 0 < header_size <= path.stat().st_size - 8


class TraceFile:
    """A trace on disk, read lazily: one layer's tensors at a time."""

    def __init__(self, path: str | Path):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise TraceError(f"trace file {str(self.path)!r} not found")
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                self._names = set(handle.keys())
        except SafetensorError as err:
            raise TraceError(f"trace file {str(self.path)!r} is not a readable safetensors file: {err}") from None
        if header.get("format") != TRACE_FORMAT or "trace" not in header:
            raise TraceError(
                f"{str(self.path)!r} is a safetensors file but not a moe_lab trace (its metadata has no "
                f"format={TRACE_FORMAT!r}); record one with `python -m moe_lab trace`"
            )
        self.metadata = json.loads(header["trace"])
        if self.metadata.get("version") != TRACE_VERSION:
            raise TraceError(
                f"trace file {str(self.path)!r} has format version {self.metadata.get('version')!r}; "
                f"this moe_lab reads version {TRACE_VERSION}"
            )
        self.cfg = moe_config_from_dict(self.metadata["moe_config"])
        self.moe_layers: list[int] = list(self.metadata["moe_layers"])
        self.hidden_state_layers: list[int] = list(self.metadata["hidden_state_layers"])
        self.n_tokens: int = int(self.metadata["n_tokens"])

    @property
    def label(self) -> str:
        checkpoint = self.metadata.get("checkpoint", {})
        return checkpoint.get("name") or self.path.stem

    def default_layer(self) -> int:
        """Return the first layer with recorded hidden states, else the first MoE layer."""
        return (self.hidden_state_layers or self.moe_layers)[0]

    def check_layer(self, layer: int) -> None:
        if layer not in self.moe_layers:
            raise TraceError(
                f"trace {str(self.path)!r} has no routing for layer {layer}; its MoE layers are "
                f"{', '.join(map(str, self.moe_layers))}"
            )

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        missing = [name for name in names if name not in self._names]
        if missing:
            raise TraceError(f"trace file {str(self.path)!r} is missing tensor {missing[0]!r}")
        with safe_open(str(self.path), framework="pt", device="cpu") as handle:
            return {name: handle.get_tensor(name) for name in names}

    def routing(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((T, k) int64 expert ids, (T, k) float32 weights) of `layer`."""
        self.check_layer(layer)
        names = [f"layers.{layer}.topk_ids", f"layers.{layer}.topk_weights"]
        tensors = self._read(names)
        ids, weights = tensors[names[0]].long(), tensors[names[1]].float()
        expected = (self.n_tokens, self.cfg.top_k)
        for name, tensor in zip(names, (ids, weights)):
            if tuple(tensor.shape) != expected:
                raise TraceError(
                    f"trace file {str(self.path)!r}: {name} has shape {list(tensor.shape)}, expected {list(expected)}"
                )
        return ids, weights

    def hidden_states(self, layer: int) -> torch.Tensor | None:
        """(T, H) input of `layer`, or None when the trace did not record it."""
        if layer not in self.hidden_state_layers:
            return None
        name = f"layers.{layer}.hidden_states"
        hidden = self._read([name])[name]
        if tuple(hidden.shape) != (self.n_tokens, self.cfg.hidden):
            raise TraceError(
                f"trace file {str(self.path)!r}: {name} has shape {list(hidden.shape)}, "
                f"expected {[self.n_tokens, self.cfg.hidden]}"
            )
        return hidden

    def load(self) -> Trace:
        """Read every tensor of the trace into memory."""
        input_ids = self._read(["input_ids"])["input_ids"]
        ids, weights = {}, {}
        for layer in self.moe_layers:
            ids[layer], weights[layer] = self.routing(layer)
        hidden = {layer: self.hidden_states(layer) for layer in self.hidden_state_layers}
        return Trace(self.metadata, input_ids, ids, weights, hidden)


def open_trace(path: str | Path) -> TraceFile:
    return TraceFile(path)
