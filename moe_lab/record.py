"""Record a routing trace: run a real DeepSeek-V2-family model on text and keep what each gate chose.

The model runs through `transformers` from the local snapshot (nothing is downloaded). A
forward hook on every MoE gate module (`model.layers.L.mlp.gate`) stores the expert ids and
weights the gate returned, so the trace contains the model's own routing. For the requested
layers it also stores the gate's input, which is the hidden states entering the MoE layer. The hook reruns
moe_lab's gate on that input with the gate's weight and counts the tokens where the two
disagree, which checks that the kit's gate is the model's gate.

The text is split into paragraphs at blank lines. Each paragraph is tokenised with the
snapshot's own tokenizer and runs as its own sequence, like separate requests in one batch.
The trace format is described in `moe_lab.trace`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import time
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .moe import gate
from .trace import Trace, TraceError

log = logging.getLogger(__name__)

GATE_MODULE = re.compile(r"model\.layers\.(\d+)\.mlp\.gate")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_TRACE_DIR = "data/traces"


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs of `text`: blocks separated by blank lines, stripped, empty ones dropped."""
    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def tokenize_text(checkpoint_dir: str | Path, text: str, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each paragraph, with the snapshot's own tokenizer, `max_tokens` in all at most."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local snapshot never needs the hub
    from transformers import AutoTokenizer

    if max_tokens is not None and max_tokens < 1:
        raise TraceError(f"max_tokens must be >= 1, got {max_tokens}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise TraceError(f"cannot load the tokenizer of checkpoint {str(checkpoint_dir)!r}: {err}") from None

    sequences, total = [], 0
    for paragraph in split_paragraphs(text):
        ids = list(tokenizer(paragraph)["input_ids"])
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if ids:
            sequences.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not sequences:
        raise TraceError("the text gave no tokens; give a text file with at least one non-empty paragraph")
    return sequences


def load_model(checkpoint_dir: str | Path, device: str = "cpu", model_dtype: str = "auto"):
    """Load the snapshot's causal language model through `transformers`, in eval mode on `device`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    if model_dtype not in MODEL_DTYPES:
        raise TraceError(f"unknown model dtype {model_dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
    dtype = model_dtype if model_dtype == "auto" else getattr(torch, model_dtype)
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise TraceError(f"invalid device {device!r}; use cpu or cuda:N") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise TraceError(f"device {device!r} needs a GPU, but torch sees none; use --device cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise TraceError(f"transformers cannot load checkpoint {str(checkpoint_dir)!r}: {err}") from None
    # NOTE: only device="cpu" was run; a GPU needs the whole model in its memory (no device map).
    return model.to(device).eval()


class GateRecorder:
    """Forward hooks on the gate modules that store each layer's routing, per forward call."""

    def __init__(self, model, checkpoint: Checkpoint, hidden_layers: set[int]):
        self.cfg = checkpoint.cfg
        self.hidden_layers = hidden_layers
        self.gates = {
            int(match.group(1)): module
            for name, module in model.named_modules()
            if (match := GATE_MODULE.fullmatch(name))
        }
        if not self.gates:
            raise TraceError(
                f"the model built from {str(checkpoint.path)!r} has no module named model.layers.L.mlp.gate; "
                f"it is not a DeepSeek-V2-family model"
            )
        missing = sorted(hidden_layers - set(self.gates))
        if missing:
            raise TraceError(f"layer {missing[0]} has no MoE gate; choose among {sorted(self.gates)}")
        self.ids: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.gates}
        self.weights: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.gates}
        self.hidden: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
        self.mismatched = {layer: 0 for layer in self.gates}
        self.max_weight_difference = {layer: 0.0 for layer in self.gates}
        self.handles = []

    def __enter__(self) -> GateRecorder:
        for layer, module in self.gates.items():
            self.handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, layer: int):
        def record(module, args, output) -> None:
            hidden = args[0].reshape(-1, self.cfg.hidden)  # (T, H) gate input
            ids, weights = routing_of_gate_output(output, self.cfg.top_k)
            self.ids[layer].append(ids.detach().cpu().long())
            self.weights[layer].append(weights.detach().cpu().float())
            if layer in self.hidden:
                self.hidden[layer].append(hidden.detach().cpu().clone())
            self._check_against_kit_gate(layer, hidden, module.weight, ids, weights)

        return record

    def _check_against_kit_gate(self, layer, hidden, gate_weight, ids, weights) -> None:
        kit_ids, kit_weights = gate(hidden.detach(), gate_weight.detach(), self.cfg)
        model_ids, model_order = ids.long().sort(dim=1)
        kit_ids, kit_order = kit_ids.sort(dim=1)
        same = (model_ids == kit_ids).all(dim=1)
        self.mismatched[layer] += int((~same).sum())
        if same.any():
            difference = (weights.float().gather(1, model_order) - kit_weights.gather(1, kit_order))[same].abs().max()
            self.max_weight_difference[layer] = max(self.max_weight_difference[layer], float(difference))


def routing_of_gate_output(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), each (T, k), from what a DeepSeek-V2 gate module returns.

    transformers 5 returns (router_logits, topk_weights, topk_indices); DeepSeek's own modeling
    code returns (topk_idx, topk_weight, aux_loss). Both hold one integer and one float (T, k)
    tensor, so they are picked by dtype and shape.
    """
    items = output if isinstance(output, (tuple, list)) else (output,)
    tensors = [item for item in items if isinstance(item, torch.Tensor) and item.dim() >= 1 and item.shape[-1] == top_k]
    ids = [tensor for tensor in tensors if not tensor.is_floating_point()]
    weights = [tensor for tensor in tensors if tensor.is_floating_point()]
    if not ids or not weights:
        raise TraceError(
            f"the gate module returned {[type(item).__name__ for item in items]}; expected an integer and a "
            f"float tensor of {top_k} columns (expert ids and weights)"
        )
    # With top_k == n_experts the router logits also have top_k columns; the weights come last.
    return ids[-1].reshape(-1, top_k), weights[-1].reshape(-1, top_k)


def record_trace(
    checkpoint_dir: str | Path,
    sequences: list[list[int]],
    hidden_layers: list[int] | tuple[int, ...] = (),
    device: str = "cpu",
    model_dtype: str = "auto",
    text_info: dict | None = None,
) -> Trace:
    """Run the snapshot's model on each token sequence and return the routing of every MoE layer."""
    checkpoint = open_checkpoint(checkpoint_dir)  # rejects what the kit cannot replay before loading the model
    for layer in hidden_layers:
        checkpoint.check_layer(layer)
    if not sequences or not all(sequences):
        raise TraceError("record_trace needs at least one sequence, and no empty one")
    model = load_model(checkpoint_dir, device, model_dtype)

    started = time.perf_counter()
    with GateRecorder(model, checkpoint, set(hidden_layers)) as recorder, torch.no_grad():
        for sequence in sequences:
            model(input_ids=torch.tensor([sequence], device=device), use_cache=False)
    seconds = time.perf_counter() - started

    layers = sorted(recorder.gates)
    if layers != checkpoint.moe_layers:
        log.warning("the model has gates on layers %s but config.json implies MoE layers %s", layers, checkpoint.moe_layers)
    for layer in layers:
        if recorder.mismatched[layer]:
            log.warning("layer %d: moe_lab's gate picks other experts than the model for %d tokens", layer, recorder.mismatched[layer])
    metadata = {
        "moe_config": dataclasses.asdict(checkpoint.cfg),
        "checkpoint": {"name": checkpoint.name, "revision": checkpoint.revision, "path": str(checkpoint.path.resolve())},
        "sequence_lengths": [len(sequence) for sequence in sequences],
        "text": text_info or {},
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "device": str(device),
        "forward_seconds": round(seconds, 3),
        "gate_check": {
            str(layer): {
                "mismatched_tokens": recorder.mismatched[layer],
                "max_weight_difference": recorder.max_weight_difference[layer],
            }
            for layer in layers
        },
        "versions": _versions(),
    }
    return Trace(
        metadata=metadata,
        input_ids=torch.tensor([token for sequence in sequences for token in sequence], dtype=torch.int64),
        topk_ids={layer: torch.cat(recorder.ids[layer]) for layer in layers},
        topk_weights={layer: torch.cat(recorder.weights[layer]) for layer in layers},
        hidden_states={layer: torch.cat(recorder.hidden[layer]) for layer in sorted(recorder.hidden)},
    )


def _versions() -> dict:
    import transformers

    return {
        "moe_lab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def text_file_info(path: str | Path, text: str) -> dict:
    return {
        "file": Path(path).name,
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "characters": len(text),
    }


def default_trace_path(trace: Trace, text_file: str | Path, folder: str | Path = DEFAULT_TRACE_DIR) -> Path:
    """data/traces/<checkpoint name>-<revision>-<text name>-<tokens>t.safetensors"""
    checkpoint = trace.metadata["checkpoint"]
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", checkpoint["name"])
    revision = (checkpoint.get("revision") or "norev")[:12]
    return Path(folder) / f"{name}-{revision}-{Path(text_file).stem}-{trace.n_tokens}t.safetensors"
