"""`distill(config, registry)`: a registered teacher in, a smaller, measured, gated student version out.

Distillation is a training run: `lmaas.train.run.train` with a `teacher` in its loop config, so
the student gets training's DDP/FSDP workers, checkpoints under `runs/<run id>/` in the
artifact store (local or S3), `resume` and `max_failures` restarts. Every worker loads the
frozen teacher from the registry's artifact directory; the loss is
`alpha * KL(teacher || student at T) * T^2 + (1 - alpha) * LM cross-entropy`
(`lmaas.train.loop.distillation_loss`). The finished student is then evaluated against the
teacher and registered exactly as the other compression methods do (`run.register_variant`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.compress.config import DistillConfig
from lmaas.compress.run import CompressResult, Progress, register_variant
from lmaas.data.versions import DatasetVersion, get_version
from lmaas.errors import InvalidInputError
from lmaas.registry import ModelRegistry, ModelVersion


@dataclass(frozen=True)
class DistillPlan:
    """What `check_distill` resolved: the teacher, the dataset, and both sizes."""

    teacher: ModelVersion
    dataset: DatasetVersion
    teacher_parameters: int
    student_parameters: int


def check_distill(config: DistillConfig, registry: ModelRegistry) -> DistillPlan:
    """Resolve the teacher and dataset and refuse what cannot be distilled, before any work starts.

    Parameter counts come from the configs (models built on the meta device: no weights read).

    Raises:
        NotFoundError: the teacher or the dataset does not resolve (for the registry's tenant).
        AlreadyExistsError / PermissionDeniedError: the output model is another tenant's.
        InvalidInputError: the teacher is not an fp32 causal LM, the dataset's tokenizer is not
            the teacher's, or the student is not smaller than the teacher.
    """
    teacher = registry.resolve(config.teacher)
    registry.check_writable(config.output_model or f"{teacher.name}-distilled", create=True, param="output_model")
    if teacher.task != "causal-lm":
        raise InvalidInputError(f"{teacher.ref} is a {teacher.task} model; distill needs a causal-lm teacher "
                                "(its next-token distribution is what the student learns)", param="teacher")
    if teacher.encrypted:
        raise InvalidInputError(f"{teacher.ref} is encrypted at rest; the training workers read the teacher's files "
                                "directly: distill from an unencrypted copy", param="teacher")
    _, raw = registry.read_file(teacher.ref, "config.json")
    teacher_config = json.loads(raw)
    if teacher_config.get("quantization_config"):
        raise InvalidInputError(f"{teacher.ref} is quantized; distill from its fp32 parent {teacher.parent or ''}".rstrip(),
                                param="teacher")
    dataset_ref = config.dataset or teacher.dataset
    if not dataset_ref:
        raise InvalidInputError(f"{teacher.ref} records no training dataset; set dataset=NAME:N to distill on", param="dataset")
    dataset = get_version(registry.engine, dataset_ref, tenant=registry.tenant)
    vocab = _check_tokenizer(registry, teacher, teacher_config, dataset)
    if dataset.block_size > teacher_config.get("max_position_embeddings", dataset.block_size):
        raise InvalidInputError(f"dataset {dataset.ref} has {dataset.block_size}-token rows; teacher {teacher.ref} reads at most "
                                f"{teacher_config['max_position_embeddings']}", param="dataset")
    teacher_parameters = _teacher_parameters(teacher, teacher_config)
    student_parameters = _student_parameters(config, vocab, dataset.block_size)
    if student_parameters >= teacher_parameters:
        raise InvalidInputError(
            f"student {config.model} {config.student_overrides or ''} has {student_parameters:,} parameters, not fewer than "
            f"teacher {teacher.ref}'s {teacher_parameters:,}; pick a smaller student size or student_overrides".replace("  ", " "),
            param="student")
    return DistillPlan(teacher=teacher, dataset=dataset, teacher_parameters=teacher_parameters,
                       student_parameters=student_parameters)


def distill(config: DistillConfig, registry: ModelRegistry, *, resume: str | None = None, progress: Progress | None = None,
            workdir: str | Path | None = None) -> CompressResult:
    """Distill `config.teacher` into a `config.student` model on the connected Ray cluster; evaluate, register, gate.

    Args:
        config: the run.
        registry: where the teacher is and the student goes (its storage also holds the run).
        resume: id of an earlier distillation run to continue from its latest checkpoint.
        progress: called with a short line per step report and as each later step starts.
        workdir: scratch directory (default: a temporary one, removed after).

    Raises:
        NotFoundError, InvalidInputError: from `check_distill` (and the cluster check), before any work.
        JobFailedError: the training run failed after `max_failures` restarts.
    """
    import torch

    from lmaas.compress import evaluate as ev
    from lmaas.models import load_model
    from lmaas.train.run import fetch_model, train

    say = progress or (lambda _line: None)
    plan = check_distill(config, registry)
    teacher = plan.teacher
    storage = registry.storage
    spec = {"ref": teacher.ref, "storage_uri": storage.uri, "endpoint_url": storage.endpoint_url, "prefix": teacher.prefix,
            "manifest_sha256": teacher.manifest_sha256, "temperature": config.temperature, "alpha": config.alpha}
    say(f"distilling {teacher.ref} ({plan.teacher_parameters:,} parameters) into a {config.model} student "
        f"({plan.student_parameters:,}) on {plan.dataset.ref}, {config.strategy} x{config.num_workers}")

    def report(m: dict[str, Any]) -> None:
        val = f" val_loss {m['val_loss']:.3f}" if "val_loss" in m else ""
        say(f"step {m['step']}/{config.max_steps} loss {m['loss']:.3f} lm_loss {m.get('lm_loss', m['loss']):.3f}{val}")

    run = train(config.train_config(plan.dataset.ref), storage=storage, engine=registry.engine, resume=resume,
                progress=report, model_overrides=dict(config.student_overrides), teacher=spec, register=False,
                tenant=registry.tenant)
    scratch = Path(tempfile.mkdtemp(prefix="lmaas-distill-", dir=workdir))
    try:
        if config.eval_threads:
            torch.set_num_threads(config.eval_threads)
        teacher_dir, student_dir = scratch / "teacher", scratch / "student"
        say(f"downloading {teacher.ref}")
        registry.download(teacher.ref, teacher_dir)
        fetch_model(storage, run.run_id, student_dir)
        teacher_model = load_model(teacher_dir)
        # the held-out rows of the dataset the student was distilled on
        data = ev.held_out_data(dataclasses.replace(teacher, dataset=plan.dataset.ref), registry, teacher_dir,
                                tokens=config.eval_tokens, seq_len=config.eval_seq_len, batch_size=config.decode_batch_size,
                                max_seq_len=plan.dataset.block_size)
        final = run.metrics
        extra = {"parameter_ratio": plan.student_parameters / plan.teacher_parameters, "train_steps": final.get("step", 0),
                 "train_restarts": final.get("restarts", 0),
                 **{f"train_{k}": final[k] for k in ("loss", "lm_loss", "val_loss") if k in final}}
        record = {"run": run.run_id, "dataset": plan.dataset.ref, "seconds": round(run.seconds, 2),
                  "teacher_parameters": plan.teacher_parameters, "student_parameters": plan.student_parameters}
        return register_variant(
            registry, teacher, teacher_model, teacher_dir, student_dir, data, method="distill", parameters=config.parameters(),
            record=record, extra=extra, gate=config.gate, name=config.output_model or f"{teacher.name}-distilled",
            alias=config.alias, dataset=plan.dataset.ref, dataset_sha256=plan.dataset.content_hash, run=run.run_id,
            new_tokens=config.decode_tokens, repeats=config.timing_repeats, say=say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_tokenizer(registry: ModelRegistry, teacher: ModelVersion, teacher_config: dict[str, Any],
                     dataset: DatasetVersion) -> int:
    """The shared vocabulary size; refuses a dataset tokenized differently from the teacher's tokenizer."""
    from lmaas.train.run import check_dataset_tokenizer

    return check_dataset_tokenizer(registry, teacher, teacher_config, dataset, role="teacher",
                                   remedy="distill on a dataset tokenized with the teacher's tokenizer")


def _teacher_parameters(teacher: ModelVersion, teacher_config: dict[str, Any]) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmaas.models import parameter_count

    fields = {k: v for k, v in teacher_config.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = AutoConfig.for_model(teacher_config.get("model_type", ""), **fields)
        with torch.device("meta"):
            return parameter_count(AutoModelForCausalLM.from_config(config))
    except (ValueError, KeyError) as exc:
        raise InvalidInputError(f"{teacher.ref} ({teacher_config.get('model_type')}) is not a causal LM transformers can "
                                f"build: {str(exc).splitlines()[0]}", param="teacher") from None


def _student_parameters(config: DistillConfig, vocab: int, block_size: int) -> int:
    import torch

    from lmaas.models import build_model, model_config, parameter_count

    with torch.device("meta"):
        return parameter_count(build_model(model_config(config.model, vocab_size=vocab, max_seq_len=block_size, eos_id=0,
                                                        **config.student_overrides), seed=None))
