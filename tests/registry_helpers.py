"""Tiny real model directories for registry tests (safetensors weights, HF-style config)."""

from __future__ import annotations

import json
from pathlib import Path


def make_model_dir(root: Path, seed: int = 0, size: int = 16) -> Path:
    """A real, tiny Llama directory (config.json, model.safetensors, tokenizer.json) whose weights differ by `seed`.

    It passes the registry's causal-LM check (architecture, tokenizer, weight shapes) and loads with
    transformers; `size` is its vocabulary and hidden size.
    """
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=size, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in LlamaForCausalLM(config).named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    save_file({name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({**config.to_dict(), "seed": seed}))
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(root / "tokenizer.json"))
    return root


def make_adapter_dir(root: Path, base_dir: Path, *, seed: int = 0, rank: int = 4, target_modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A real PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors) for the model in
    `base_dir`, with random non-zero factors (PEFT starts B at zero, which would make it a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(root)
    return root


def publish_unreadable_dataset(storage, engine, root: Path, name: str, tenant: str, *, sources: list[str], content: bytes = b"rows") -> None:
    """Version 1 of dataset `name`, owned by `tenant`: recorded like a real one, but its shards are not Parquet
    (any job that tried to train on it would fail loudly). For tests of who may see and use a dataset."""
    from lmaas.data.versions import publish_version

    for split in ("train", "validation"):
        (root / split).mkdir(parents=True)
        (root / split / "part-00000.parquet").write_bytes(content)
    publish_version(storage, engine, root, {
        "name": name, "tenant": tenant, "sources": sources, "content_hash": "1" * 64, "tokenizer_hash": "2" * 64,
        "block_size": 32, "vocab_size": 512, "documents": 1, "train_rows": 1, "validation_rows": 1, "tokens": 64})
