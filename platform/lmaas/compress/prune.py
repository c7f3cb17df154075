"""Magnitude pruning: unstructured to an exact sparsity, or 2:4 semi-structured, plus a masked recovery fine-tune."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing exactly `round(sparsity * numel)` smallest-magnitude entries."""
    n_zero = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    if n_zero:
        # argsort, not a threshold: ties at the threshold would make the count inexact
        keep[torch.argsort(weight.detach().abs().flatten(), stable=True)[:n_zero]] = False
    return keep.reshape(weight.shape)


def semi_structured_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask with 2 kept of every 4 consecutive inputs (the 2:4 pattern sparse kernels use).

    Raises:
        ValueError: the input width is not a multiple of 4.
    """
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 pruning needs an input width divisible by 4, got {in_features}")
    groups = weight.detach().abs().reshape(out_features, in_features // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(out_features, in_features)


def prunable_linears(model: "PreTrainedModel") -> dict[str, nn.Linear]:
    """The linear layers pruning touches: all but the LM head (often tied to the embedding)."""
    head = model.get_output_embeddings()
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@torch.no_grad()
def prune_model(model: "PreTrainedModel", sparsity: float, pattern: str = "unstructured") -> dict[str, torch.Tensor]:
    """Zero weights of every prunable linear layer in place; returns the keep-masks by module name."""
    masks = {}
    for name, linear in prunable_linears(model).items():
        mask = semi_structured_mask(linear.weight) if pattern == "2:4" else magnitude_mask(linear.weight, sparsity)
        linear.weight.mul_(mask)
        masks[name] = mask
    return masks


def sparsity_of(model: "PreTrainedModel") -> float:
    """Share of zeros over the prunable linear weights."""
    weights = [m.weight for m in prunable_linears(model).values()]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


DEFAULT_RECOVERY_LR = 1e-4
"""Recovery learning rate for a parent without a training record (imported, or trained elsewhere)."""


def recovery_lr_of(model_dir: str | Path) -> float:
    """The learning rate to recover a pruned copy of the model in `model_dir` at: where its training schedule ended.

    That is `lr x min_lr_ratio` of the run in its `lmaas_training.json` (what `lmaas.train` registers;
    a tenth of `lr` for a schedule that decays to 0), else `DEFAULT_RECOVERY_LR`. A recovery fine-tune
    should nudge a trained model back, not re-train it: at 1e-3, above the 3e-4 its parent's schedule
    ended at, 60 recovery steps after 50% pruning left perplexity +6.6% over the parent, worse than no
    recovery (+5.9%); at 3e-4 it ended at -0.1%, at 1e-4 at +0.1% (bench/compression.py's parent, 3.5M
    parameters).
    """
    from lmaas.train.config import TrainConfig

    record = Path(model_dir) / "lmaas_training.json"
    try:
        config = TrainConfig(**json.loads(record.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one this version cannot read
        return DEFAULT_RECOVERY_LR
    return config.lr * config.min_lr_ratio if config.min_lr_ratio > 0 else config.lr * 0.1


def recover(
    model: "PreTrainedModel",
    masks: dict[str, torch.Tensor],
    batches: Iterator[torch.Tensor],
    *,
    steps: int,
    lr: float,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Fine-tune a pruned model for `steps` batches of token ids, re-applying the masks after each step.

    A plain single-process loop (AdamW, constant LR): recovery is short, and the full training
    loop lives in `lmaas.train`.

    Returns:
        The loss of every step.
    """
    linears = prunable_linears(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        ids = next(batches)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for name, mask in masks.items():
                linears[name].weight.mul_(mask)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, losses[-1])
    model.eval()
    return losses
