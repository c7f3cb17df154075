"""Compression: a registered causal LM in, a measured and gated child version out.

    from lmaas.compress import CompressConfig, DistillConfig, compress
    result = compress(CompressConfig(ref="tiny-lm", method="int8-dynamic"), registry)
    result.version.ref, result.report["ratios"], result.passed

    # a Ray Train job: connect to a cluster first (lmaas.cluster.connect)
    result = compress(DistillConfig(teacher="tiny-lm", student="tiny", student_overrides={"num_hidden_layers": 1}), registry)

Methods: `int8-dynamic`, `int8-weight`, `int4-weight` (quantized directories, see
`lmaas.models.quantized`), `prune` (magnitude, unstructured or 2:4, optional masked recovery
fine-tune), `export` (ONNX checked in onnxruntime; TorchScript to a local file), and `distill`
(`distill.distill`: knowledge distillation into a smaller student, run as the training job of
`lmaas.train` with the teacher loaded frozen in every worker and the loss
`alpha * KL * T^2 + (1 - alpha) * LM`; DDP/FSDP, checkpoints, resume and restarts as training).

Every method ends in `run.register_variant`: the variant is evaluated against its parent on the
same held-out data (`evaluate.evaluate`), gated (`run.gate_reasons`), and registered as a child
version (`parent` lineage, `compression.json`, `report.json`), archived if it misses the gate.
"""

from lmaas.compress.config import METHODS, CompressConfig, DistillConfig, GateConfig
from lmaas.compress.run import CompressResult, check_request, compress

__all__ = ["METHODS", "CompressConfig", "CompressResult", "DistillConfig", "GateConfig", "check_request", "compress"]
