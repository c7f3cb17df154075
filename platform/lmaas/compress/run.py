"""`compress(config, registry)`: one registered causal LM in, one measured, gated child version out.

Steps: check the request (before any work), download the parent, apply the method into a new
model directory (with `compression.json`), evaluate it against the parent on the same held-out
data (`report.json`), register it with `parent=` lineage and the report as metrics, then
archive it if it misses the gate, or point `alias` at it if it passes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmaas.compress.config import CompressConfig, DistillConfig, GateConfig
from lmaas.errors import InvalidInputError
from lmaas.registry import ModelRegistry, ModelVersion

COMPRESSION_FILE = "compression.json"
REPORT_FILE = "report.json"
QUANT_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CompressResult:
    """The registered variant, its report, and whether it passed the gate."""

    version: ModelVersion
    report: dict[str, Any]
    passed: bool
    reasons: list[str]


def check_request(config: CompressConfig | DistillConfig, registry: ModelRegistry) -> ModelVersion:
    """Resolve the parent and refuse what this method cannot compress, before any work starts.

    Raises:
        NotFoundError: the reference does not resolve (for the registry's tenant, when it acts for one).
        AlreadyExistsError / PermissionDeniedError: the output model is another tenant's.
        InvalidInputError: not a causal LM, already quantized, or recovery without a training dataset
            (for distill: see `distill.check_distill`).
    """
    if isinstance(config, DistillConfig):
        from lmaas.compress.distill import check_distill

        return check_distill(config, registry).teacher
    parent = registry.resolve(config.ref)
    registry.check_writable(config.output_name or f"{parent.name}-{config.method}", create=True, param="output_name")
    if parent.task != "causal-lm":
        raise InvalidInputError(
            f"{parent.ref} is a {parent.task} model; {config.method} compresses causal-lm versions only "
            "(its report needs next-token perplexity)", param="ref")
    _, raw = registry.read_file(parent.ref, "config.json")
    model_config = json.loads(raw)
    if model_config.get("quantization_config"):
        raise InvalidInputError(f"{parent.ref} is already quantized; compress its fp32 parent {parent.parent or ''}".rstrip(),
                                param="ref")
    if config.method == "prune" and config.recovery_steps and not parent.dataset:
        raise InvalidInputError(f"{parent.ref} records no training dataset to recover on; set recovery_steps=0", param="recovery_steps")
    if config.method == "export" and "onnx" in config.formats:
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise InvalidInputError(f"ONNX export needs {', '.join(missing)}: pip install 'lmaas[export]'", param="formats")
    if config.method == "int4-weight":
        widths = {model_config.get("hidden_size"), model_config.get("intermediate_size")}
        bad = sorted(w for w in widths if isinstance(w, int) and w % config.group_size)
        if bad:
            raise InvalidInputError(f"group_size {config.group_size} does not divide layer width {bad[0]} of {parent.ref}", param="group_size")
    if config.method == "prune" and config.pattern == "2:4":
        widths = {model_config.get("hidden_size"), model_config.get("intermediate_size")}
        if any(isinstance(w, int) and w % 4 for w in widths):
            raise InvalidInputError(f"2:4 pruning needs layer widths divisible by 4; {parent.ref} has {sorted(widths)}", param="pattern")
    return parent


def gate_reasons(report: dict[str, Any], gate: GateConfig) -> list[str]:
    """Why a variant misses the gate (empty: it passes)."""
    reasons = []
    ratios, variant = report["ratios"], report["variant"]
    if gate.max_perplexity_increase is not None and ratios["perplexity_increase"] > gate.max_perplexity_increase:
        reasons.append(f"perplexity +{ratios['perplexity_increase']:.2%} > +{gate.max_perplexity_increase:.2%}")
    if gate.min_agreement is not None and variant["agreement"] < gate.min_agreement:
        reasons.append(f"agreement {variant['agreement']:.3f} < {gate.min_agreement}")
    if gate.max_size_ratio is not None and ratios["size_ratio"] > gate.max_size_ratio:
        reasons.append(f"size ratio {ratios['size_ratio']:.3f} > {gate.max_size_ratio}")
    return reasons


def compress(config: CompressConfig | DistillConfig, registry: ModelRegistry, *, progress: Progress | None = None,
             workdir: str | Path | None = None) -> CompressResult:
    """Apply `config.method` to `config.ref`, evaluate, register the child version and gate it.

    Args:
        config: the run; a `DistillConfig` runs `distill.distill` (a Ray Train job: needs a
            connected Ray cluster).
        registry: where the parent is and the child goes (its storage and engine also reach the dataset).
        progress: called with a short line as each step starts.
        workdir: scratch directory (default: a temporary one, removed after).

    Raises:
        NotFoundError, InvalidInputError: from `check_request`, before any work.
        JobFailedError: an export does not match PyTorch.
    """
    if isinstance(config, DistillConfig):
        from lmaas.compress.distill import distill

        return distill(config, registry, progress=progress, workdir=workdir)
    say = progress or (lambda _line: None)
    parent = check_request(config, registry)
    scratch = Path(tempfile.mkdtemp(prefix="lmaas-compress-", dir=workdir))
    try:
        return _compress(config, registry, parent, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compress(config: CompressConfig, registry: ModelRegistry, parent: ModelVersion, scratch: Path, say: Progress) -> CompressResult:
    from lmaas.compress import evaluate as ev
    from lmaas.models import load_model

    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    parent_dir, child_dir = scratch / "parent", scratch / "variant"
    say(f"downloading {parent.ref}")
    registry.download(parent.ref, parent_dir)
    parent_model = load_model(parent_dir)
    data = ev.held_out_data(parent, registry, parent_dir, tokens=config.eval_tokens, seq_len=config.eval_seq_len,
                            batch_size=config.batch_size, max_seq_len=parent_model.config.max_position_embeddings)
    if config.method == "prune" and config.recovery_steps and config.recovery_lr is None:
        from lmaas.compress.prune import recovery_lr_of

        config = config.model_copy(update={"recovery_lr": recovery_lr_of(parent_dir)})  # recorded with the variant
    started = time.time()
    say(f"{config.method} {json.dumps(config.parameters())}")
    extra = _apply(config, registry, parent, parent_dir, child_dir, data, say)
    record = {"seconds": round(time.time() - started, 2), **extra.pop("record", {})}
    return register_variant(
        registry, parent, parent_model, parent_dir, child_dir, data, method=config.method, parameters=config.parameters(),
        record=record, extra=extra, gate=config.gate, name=config.output_name or f"{parent.name}-{config.method}",
        alias=config.alias, dataset=parent.dataset, run=f"compress-{config.method}", new_tokens=config.decode_tokens,
        repeats=config.timing_repeats, say=say)


def register_variant(
    registry: ModelRegistry, parent: ModelVersion, parent_model: Any, parent_dir: Path, child_dir: Path, data: Any, *,
    method: str, parameters: dict[str, Any], record: dict[str, Any], extra: dict[str, Any], gate: GateConfig, name: str,
    alias: str | None, dataset: str | None, run: str, new_tokens: int, repeats: int, say: Progress,
    dataset_sha256: str | None = None,
) -> CompressResult:
    """The common end of every method: evaluate the variant in `child_dir` against its parent, gate it, register it.

    Writes `compression.json` (method, parameters, parent, `record`) and `report.json` into
    `child_dir`, registers it as the next version of `name` with `parent` lineage and the report
    as metrics, then archives it if it misses `gate`, or points `alias` at it if it passes.

    Args:
        extra: numbers of the method's own added to the report's `variant` side.
    """
    from lmaas.compress import evaluate as ev
    from lmaas.models import load_model

    (child_dir / COMPRESSION_FILE).write_text(json.dumps({"method": method, "parameters": parameters, "parent": parent.ref,
                                                          **record}, indent=1))
    say(f"evaluating against {parent.ref} on {data.source}")
    variant_model = load_model(child_dir)
    report = ev.evaluate(variant_model, parent_model, data, variant_dir=child_dir, parent_dir=parent_dir,
                         new_tokens=new_tokens, repeats=repeats)
    report["variant"].update(extra)
    reasons = gate_reasons(report, gate)
    report.update(method=method, parameters=parameters, parent_ref=parent.ref,
                  gate={**gate.model_dump(), "passed": not reasons, "reasons": reasons})
    (child_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    verdict = "passed the gate" if not reasons else "gate failed: " + "; ".join(reasons)
    say(f"registering {name} ({verdict})")
    version = registry.register_version(
        name, child_dir, task="causal-lm", parent=parent.ref, dataset=dataset, dataset_sha256=dataset_sha256, run=run,
        metrics=report_metrics(report), description=f"{method} {json.dumps(parameters)} of {parent.ref}; {verdict}")
    if reasons:
        version = registry.archive(version.ref)
    elif alias:
        registry.set_alias(version.name, alias, version.version)
    return CompressResult(version=version, report=report, passed=not reasons, reasons=reasons)


def _apply(config: CompressConfig, registry: ModelRegistry, parent: ModelVersion, parent_dir: Path, child_dir: Path,
           data: Any, say: Progress) -> dict[str, Any]:
    """Write the variant into `child_dir`; returns extra numbers for the report (and a `record` for compression.json)."""
    from lmaas.models import load_model, save_model

    model = load_model(parent_dir)
    if config.method in QUANT_METHODS:
        from lmaas.models.quantized import save_quantized

        save_quantized(model, child_dir, config.method, group_size=config.group_size,
                       embeddings=config.quantize_embeddings, tokenizer_dir=parent_dir)
        return {}
    if config.method == "prune":
        from lmaas.compress import prune

        masks = prune.prune_model(model, config.sparsity, config.pattern)
        extra: dict[str, Any] = {"pruned_sparsity": prune.sparsity_of(model)}
        if config.recovery_steps:
            from lmaas.compress.evaluate import logits_of, perplexity, training_batches

            batches = training_batches(parent.dataset, registry, batch_size=config.recovery_batch_size,
                                       seq_len=model.config.max_position_embeddings, seed=config.seed)
            # the held-out perplexity before recovery: the report says what the fine-tune won back
            extra["perplexity_before_recovery"] = perplexity(logits_of(model, data.ids), data.ids)
            every = max(1, config.recovery_steps // 5)
            losses = prune.recover(model, masks, batches, steps=config.recovery_steps, lr=config.recovery_lr,
                                   progress=lambda step, loss: step % every == 0 and say(f"recovery step {step}/{config.recovery_steps} loss {loss:.3f}"))
            extra.update(recovery_first_loss=losses[0], recovery_final_loss=losses[-1])
        save_model(model, child_dir, tokenizer_dir=parent_dir)
        return extra
    if config.method == "export":
        from lmaas.compress import export

        save_model(model, child_dir, tokenizer_dir=parent_dir)
        check = data.ids[: min(4, len(data.ids))]
        extra = {}
        if "onnx" in config.formats:
            say("exporting ONNX and checking it in onnxruntime")
            extra["onnx_max_abs_diff"] = export.export_onnx(model, child_dir / export.ONNX_FILE, check_ids=check,
                                                            tolerance=config.export_tolerance)
        if "torchscript" in config.formats:
            target = Path(config.torchscript_dir or ".") / f"{parent.name}-{parent.version}.torchscript.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            say(f"tracing TorchScript to {target} (not registered: TorchScript archives embed pickle)")
            extra["torchscript_max_abs_diff"] = export.export_torchscript(model, target, check_ids=check,
                                                                          tolerance=config.export_tolerance)
            extra["record"] = {"torchscript_path": str(target.resolve())}
        return extra
    raise AssertionError(f"unhandled method {config.method}")


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report flattened into registry metrics (numbers only)."""
    metrics = {k: float(v) for k, v in report["variant"].items() if isinstance(v, (int, float))}
    metrics.update({f"parent_{k}": float(v) for k, v in report["parent"].items() if isinstance(v, (int, float))})
    metrics.update({k: float(v) for k, v in report["ratios"].items()})
    metrics["gate_passed"] = float(report["gate"]["passed"])
    return metrics
