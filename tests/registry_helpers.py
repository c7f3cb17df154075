"""Tiny real model directories for registry tests (safetensors weights, HF-style config)."""

from __future__ import annotations

import json
from pathlib import Path


def make_model_dir(root: Path, seed: int = 0, size: int = 16) -> Path:
    """A two-file model directory whose weights differ by `seed`."""
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(size, size, generator=gen), "b": torch.zeros(size)}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"hidden_size": size, "seed": seed}))
    return root
