"""Compression: a registered causal LM in, a measured and gated child version out.

    from lmaas.compress import CompressConfig, compress
    result = compress(CompressConfig(ref="tiny-lm", method="int8-dynamic"), registry)
    result.version.ref, result.report["ratios"], result.passed

Methods: `int8-dynamic`, `int8-weight`, `int4-weight` (quantized directories, see
`lmaas.models.quantized`), `prune` (magnitude, unstructured or 2:4, optional masked recovery
fine-tune), `export` (ONNX checked in onnxruntime; TorchScript to a local file).

`distill` is the seam left open: it is a training job (teacher logits + KL loss inside the Ray
Train loop of `lmaas.train`), run by `jobs/distill.py`; it should end by calling
`evaluate.evaluate(student, teacher, ...)` and `run.gate_reasons` so its report and gate match
these methods. `CompressConfig(method="distill")` is refused with a pointer there.
"""

from lmaas.compress.config import METHODS, CompressConfig, GateConfig
from lmaas.compress.run import CompressResult, check_request, compress

__all__ = ["METHODS", "CompressConfig", "CompressResult", "GateConfig", "check_request", "compress"]
