"""Export to ONNX (checked in onnxruntime against PyTorch logits) and TorchScript."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmaas.errors import JobFailedError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"


class LogitsOnly(torch.nn.Module):
    """`input_ids [batch, seq] -> logits [batch, seq, vocab]`, no cache: the graph both formats trace."""

    def __init__(self, model: "PreTrainedModel") -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(model: "PreTrainedModel", path: str | Path, *, check_ids: torch.Tensor, tolerance: float) -> float:
    """Write `model` as ONNX (dynamic batch and sequence) and compare onnxruntime with PyTorch on `check_ids`.

    Returns:
        The largest absolute logit difference.

    Raises:
        JobFailedError: the difference exceeds `tolerance`.
    """
    import onnxruntime as ort

    wrapped = LogitsOnly(model).eval()
    # batch 2, not 1: torch.export specializes a dimension traced at size 1 to a constant
    example = check_ids[:, : min(8, check_ids.shape[1])].repeat(2, 1)[:2]
    seq_max = model.config.max_position_embeddings
    for name in ("torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("seq", min=2, max=seq_max)},),
        dynamo=True,
        opset_version=18,
        verbose=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": check_ids.numpy()})[0]
    with torch.no_grad():
        want = wrapped(check_ids).numpy()
    diff = float(abs(got - want).max())
    if diff > tolerance:
        raise JobFailedError(f"ONNX export: onnxruntime logits differ from PyTorch by {diff:.2e} (> {tolerance:.0e})")
    return diff


def export_torchscript(model: "PreTrainedModel", path: str | Path, *, check_ids: torch.Tensor, tolerance: float) -> float:
    """Trace `model` to a TorchScript archive (a pickle-bearing zip: written locally, never registered).

    Returns:
        The largest absolute logit difference of the reloaded archive.
    """
    wrapped = LogitsOnly(model).eval()
    with torch.no_grad():
        traced = torch.jit.trace(wrapped, (check_ids,), check_trace=False)
        traced.save(str(path))
        diff = float((torch.jit.load(str(path))(check_ids) - wrapped(check_ids)).abs().max())
    if diff > tolerance:
        raise JobFailedError(f"TorchScript export: logits differ from PyTorch by {diff:.2e} (> {tolerance:.0e})")
    return diff
