"""A tiny DeepSeek-V2 model built with transformers and saved as a local snapshot.

It lets the tests, and readers without a downloaded checkpoint, try loading a layer and
recording a trace. Nothing is downloaded: the model has random weights and the tokenizer is
trained here on a few sentences. Layer 0 is dense, layers 1 and 2 are MoE layers with 8
experts, top-2, and two shared experts. Routing from random weights tells nothing about a real
model, so it only exercises the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=2,
    first_k_dense_replace=1,
    routed_scaling_factor=1.5,
    norm_topk_prob=False,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=128,
)
MOE_LAYERS = (1, 2)
SENTENCES = [
    "the gate scores every expert and keeps the best two",
    "tokens move between ranks over the wire",
    "shared experts see every token of the batch",
    "an expert with no tokens stays idle",
    "each rank holds half of the routed experts",
]


def build_model(seed: int = 0):
    """DeepseekV2ForCausalLM with weights of unit-scale activations, so routing is far from uniform."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**TINY_CONFIG)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:  # matrices; norms keep their ones
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * parameter.shape[-1] ** -0.5)
    return model


def build_tokenizer():
    """Train a word-level tokenizer on SENTENCES and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=TINY_CONFIG["vocab_size"], special_tokens=["[UNK]", "<bos>", "<eos>"])
    tokenizer.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<bos>", eos_token="<eos>")


def save_snapshot(model, tokenizer, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def spread_shards(source: Path, folder: Path, n_shards: int = 5) -> Path:
    """Copy a single-file snapshot into `n_shards` shards, tensors dealt out in turn.

    transformers keeps one layer's experts in one shard; checkpoints written expert by expert
    (DeepSeek-V2-Lite's among them) spread a layer over several, as this copy does.
    """
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("model.safetensors", ".cache"))
    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in sorted(handle.keys())}
    shards = [dict() for _ in range(n_shards)]
    for position, (name, tensor) in enumerate(tensors.items()):
        shards[position % n_shards][name] = tensor
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def write_tiny_snapshot(folder: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and its tokenizer and save them as a snapshot in `folder`."""
    return save_snapshot(build_model(seed), build_tokenizer(), Path(folder))
