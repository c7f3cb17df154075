"""Fine-tuning as OpenAI's API has it: a base model, a chat JSONL file, three hyperparameters.

    result = fine_tune(FineTuneConfig(model="base", training_file="chat.jsonl", suffix="support"),
                       storage=storage, engine=engine, progress=print)
    result.model_version.ref   # "base-support:1": a LoRA adapter version whose parent is base's version

One call does what `lmaas data ingest --format chat` and `lmaas train` do by hand:

1. check: the base resolves as the tenant sees it and is a causal LM with a tokenizer, the files
   exist (an uploaded file's id `file-...` must be the tenant's, purpose `fine-tune`), the output
   name is free or the tenant's (`check_fine_tune`, also what the job queue runs at submission);
2. ingest the training file as a chat dataset tokenized with the base's tokenizer and chat template
   (one example a row, the loss on the assistant turns only), all of it for training;
3. train (`train.run.train`, `method: lora` by default) for `n_epochs` passes, a checkpoint at the
   end of each epoch, and register the result (an adapter version, or a full model with `method: full`);
4. with a `validation_file`: ingest it the same way and measure the answer-token loss and accuracy of
   the base and of the result on it (on this driver, after training: the training loop evaluates on
   its own dataset's validation split only, so the validation file is not evaluated periodically).

`progress` receives events shaped like OpenAI's `fine_tuning.job.event` (`type` `message` or
`metrics`, `level`, `message`, `data`, `created_at`): the job queue keeps them for
`GET /v1/fine_tuning/jobs/{id}/events`, `lmaas finetune` draws its progress bar from them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy.engine import Engine

from lmaas.data.config import IngestConfig
from lmaas.errors import InvalidInputError, NotFoundError
from lmaas.models.family import TOKENIZER_FILES
from lmaas.registry import ModelRegistry, ModelVersion
from lmaas.registry.files import FileStore, is_file_id
from lmaas.storage import Storage
from lmaas.train.config import LoraSettings, TrainConfig, check_model_name

DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
"""The learning rate a `learning_rate_multiplier` of 1 (and `auto`) means, per method: common starting points for
LoRA and for full fine-tuning of pretrained LLMs (a tiny random-weight test model needs a multiplier of ~100)."""
MAX_BLOCK_SIZE = 1024
"""Tokens per example row when `block_size` is unset (or the base's context, if shorter); longer examples are cut."""
AUTO_MIN_EXAMPLES = 300
"""`n_epochs: auto` trains on at least this many examples (3 epochs, more for a small file, at most 25)."""
VALIDATION_ROWS = 512
"""Examples of a validation file that are evaluated (the first ones)."""
OWN_FIELDS = {
    "dataset": "training_file", "init_from": "model", "method": "method", "lora": "lora", "output_model": "output_model",
    "alias": "alias", "max_steps": "hyperparameters.n_epochs", "batch_size": "hyperparameters.batch_size",
    "lr": "hyperparameters.learning_rate_multiplier", "seed": "seed",
}
"""TrainConfig fields a fine-tune sets itself, and the FineTuneConfig field to use instead."""

Event = dict[str, Any]
Progress = Callable[[Event], None]


class Hyperparameters(BaseModel):
    """OpenAI's fine-tuning hyperparameters, each `auto` or a value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: Literal["auto"] | int = "auto"
    """Passes over the training file. `auto`: 3, or more for a small file (see `AUTO_MIN_EXAMPLES`)."""

    batch_size: Literal["auto"] | int = "auto"
    """Examples per optimizer step, over all workers (rounded up to a multiple of the workers x `grad_accum`).
    `auto`: 1 % of the examples, 8 to 32 (at most the whole file)."""

    learning_rate_multiplier: Literal["auto"] | float = "auto"
    """The peak learning rate as a multiple of `DEFAULT_LR` for the method. `auto`: 1."""

    @field_validator("n_epochs")
    @classmethod
    def _check_epochs(cls, value: Any) -> Any:
        if value != "auto" and not 1 <= value <= 100:
            raise ValueError(f"n_epochs must be auto or 1 to 100, got {value}")
        return value

    @field_validator("batch_size")
    @classmethod
    def _check_batch(cls, value: Any) -> Any:
        if value != "auto" and not 1 <= value <= 4096:
            raise ValueError(f"batch_size must be auto or 1 to 4096, got {value}")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _check_multiplier(cls, value: Any) -> Any:
        if value != "auto" and not 0 < value <= 1000:
            raise ValueError(f"learning_rate_multiplier must be auto or above 0 (at most 1000), got {value}")
        return value


class FineTuneConfig(BaseModel):
    """One fine-tune (YAML: `jobs/configs/finetune_*.yaml`, `--set key=value` overrides; the body of
    `POST /v1/fine_tuning/jobs` maps onto it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    """The base: a registered causal LM (`name`, `name:N`, `name@alias`), unquantized Llama, Mistral, Qwen2, Qwen3 or GPT-2."""

    training_file: str
    """Chat JSONL (`{"messages": [...]}` or `{"prompt", "completion"}` lines): an uploaded file's id (`file-...`,
    from `/v1/files` with purpose `fine-tune`), or a path or URI (a tenant's job may read only its own uploads)."""

    validation_file: str | None = None
    """The same format, held out: the base's and the result's loss on it are measured after training."""

    method: Literal["lora", "full"] = "lora"
    """`lora`: train a LoRA adapter beside the frozen base (an adapter version). `full`: train every weight (a full model)."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    """The adapter of a `method: lora` fine-tune."""

    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)

    suffix: str | None = Field(default=None, max_length=64)
    """Part of the result's name: `<base name>-<suffix>` (lowercase letters, digits, `.`, `_`, `-`)."""

    output_model: str | None = None
    """Registry name of the result (default `<base name>-<suffix>`, or `<base name>-ft`); each fine-tune is a new version."""

    alias: str | None = None
    """Alias (e.g. `staging`) to point at the registered version."""

    seed: int = 0
    """Weight initialization of the adapter and data shuffling."""

    block_size: int | None = Field(default=None, ge=8)
    """Tokens per example (longer ones are cut); None: the base's context, at most `MAX_BLOCK_SIZE`."""

    metadata: dict[str, str] = Field(default_factory=dict)
    """Up to 16 key-value pairs kept with the job (OpenAI's `metadata`)."""

    train: dict[str, Any] = Field(default_factory=dict)
    """Other `TrainConfig` fields (`num_workers`, `cpus_per_worker`, `use_gpu`, `strategy`, `grad_accum`, ...);
    the ones a fine-tune sets itself (`dataset`, `max_steps`, `lr`, ...) are refused, naming the field to use."""

    @field_validator("suffix", "output_model")
    @classmethod
    def _check_names(cls, value: str | None) -> str | None:
        return check_model_name(value)

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("at most 16 pairs, keys up to 64 characters, values up to 512")
        return value

    @field_validator("train")
    @classmethod
    def _check_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in OWN_FIELDS:
                raise ValueError(f"{key} is set by the fine-tune; use {OWN_FIELDS[key]}")
            if key not in TrainConfig.model_fields:
                raise ValueError(f"{key} is not a TrainConfig field")
        try:
            TrainConfig(**value)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        return value

    @model_validator(mode="after")
    def _check_together(self) -> "FineTuneConfig":
        try:
            self.train_config(examples=1000)  # the cross-field checks (QLoRA needs a GPU, ...) before anything runs
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    @property
    def result_name(self) -> str:
        """The registry name of the result."""
        if self.output_model:
            return self.output_model
        base = self.model.split("@", 1)[0].split(":", 1)[0]
        return f"{base[: 99 - len(self.suffix or 'ft')]}-{self.suffix or 'ft'}"

    def resolved_hyperparameters(self, examples: int) -> dict[str, Any]:
        """`hyperparameters` with each `auto` replaced by what a training file of `examples` examples gets."""
        hp = self.hyperparameters
        workers, accum = self._train_field("num_workers"), self._train_field("grad_accum")
        batch = hp.batch_size if hp.batch_size != "auto" else max(1, min(examples, 32, max(8, examples // 100)))
        per_worker = max(1, math.ceil(batch / (workers * accum)))
        epochs = hp.n_epochs if hp.n_epochs != "auto" else min(25, max(3, math.ceil(AUTO_MIN_EXAMPLES / max(1, examples))))
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
        return {"n_epochs": epochs, "batch_size": per_worker * workers * accum, "learning_rate_multiplier": multiplier,
                "per_worker_batch_size": per_worker}

    def train_config(self, *, examples: int, dataset: str = "fine-tune") -> TrainConfig:
        """The `TrainConfig` of this fine-tune on a training file of `examples` examples (ingested as `dataset`).

        One epoch is `ceil(examples / batch_size)` optimizer steps; a checkpoint (and, with `train.eval_interval`
        unset, the training loop's evaluation) comes at the end of each epoch, the last 3 kept.
        """
        hp = self.resolved_hyperparameters(examples)
        steps_per_epoch = max(1, math.ceil(examples / hp["batch_size"]))
        max_steps = steps_per_epoch * hp["n_epochs"]
        defaults = {
            "warmup_steps": min(10, max_steps // 10),
            "log_interval": max(1, min(10, steps_per_epoch)),
            "eval_interval": steps_per_epoch,
            "checkpoint_interval": steps_per_epoch,
            "keep_checkpoints": 3,
        }
        return TrainConfig(**{**defaults, **self.train}, dataset=dataset, init_from=self.model, method=self.method, lora=self.lora,
                           output_model=self.result_name, alias=self.alias, max_steps=max_steps, batch_size=hp["per_worker_batch_size"],
                           lr=DEFAULT_LR[self.method] * hp["learning_rate_multiplier"], seed=self.seed)

    def _train_field(self, name: str) -> Any:  # noqa: ANN401 - a TrainConfig value
        return self.train.get(name, TrainConfig.model_fields[name].default)


@dataclass
class FineTuneResult:
    """A finished fine-tune."""

    model_version: ModelVersion
    """The registered result (`task: adapter` for LoRA, its parent the base)."""
    base: str
    """The base version, `name:N`."""
    run_id: str
    dataset: str
    """The training file's dataset version, `name:N`."""
    hyperparameters: dict[str, Any]
    """As resolved (`auto` replaced)."""
    metrics: dict[str, Any]
    """The last step's training metrics; with a validation file also `full_valid_loss`, `full_valid_mean_token_accuracy`
    and the base's `base_valid_loss`, `base_valid_mean_token_accuracy`."""
    history: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    """The run's kept checkpoints, oldest first: `step`, `metrics`, `checkpoint` (the registered ref for the last one,
    else `<run id>/<checkpoint directory>`, a run artifact that is not registered)."""
    trained_tokens: int
    """Tokens the trainer processed (example rows, padding included) over all epochs."""
    seconds: float
    validation_dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON (what a queued job keeps, `lmaas finetune --json` prints)."""
        return {"model": self.model_version.ref, "base": self.base, "task": self.model_version.task, "run_id": self.run_id,
                "dataset": self.dataset, "validation_dataset": self.validation_dataset, "hyperparameters": self.hyperparameters,
                "metrics": self.metrics, "checkpoints": self.checkpoints, "trained_tokens": self.trained_tokens,
                "seconds": round(self.seconds, 1)}


@dataclass(frozen=True)
class _Checked:
    base: ModelVersion
    training_source: str
    validation_source: str | None


def check_fine_tune(config: FineTuneConfig, *, storage: Storage, engine: Engine, tenant: str | None = None) -> ModelVersion:
    """Refuse a fine-tune that could not start, before anything runs; returns the base version.

    Args:
        tenant: who it runs for (None: the operator, who sees every tenant's models and files).

    Raises:
        NotFoundError: the base or a file does not exist, or `tenant` may not see it (`param` `model`,
            `training_file` or `validation_file`).
        InvalidInputError: the base is not a causal LM with a tokenizer, a file is not a `fine-tune` upload.
        AlreadyExistsError / PermissionDeniedError: the output name belongs to another tenant (`param` `output_model`).
    """
    return _check(config, storage, engine, tenant).base


def _check(config: FineTuneConfig, storage: Storage, engine: Engine, tenant: str | None) -> _Checked:
    registry = ModelRegistry.configured(storage, engine)
    try:
        base = registry.resolve(config.model, tenant=tenant)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="model") from None
    if base.task == "adapter":
        raise InvalidInputError(f"model {base.ref} is a LoRA adapter; fine-tune its base ({base.parent}) instead", param="model")
    if base.task != "causal-lm":
        raise InvalidInputError(f"model {base.ref} is a {base.task} model; fine-tuning starts from a causal-lm", param="model")
    if not any(f.path == "tokenizer.json" for f in base.files):
        raise InvalidInputError(f"model {base.ref} has no tokenizer.json; the examples are tokenized with the base's tokenizer",
                                param="model")
    registry.check_writable(config.result_name, tenant=tenant, create=True, param="output_model")
    files = FileStore(storage, engine)
    sources = [_source(files, value, field, tenant) if value else None
               for field, value in (("training_file", config.training_file), ("validation_file", config.validation_file))]
    return _Checked(base, sources[0], sources[1])


def _source(files: FileStore, value: str, field: str, tenant: str | None) -> str:
    """Where an ingest reads a training or validation file from: an uploaded file's bytes, or the path as given."""
    if not is_file_id(value):
        return value
    try:
        record = files.get(value, tenant=tenant)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param=field) from None
    if record.purpose != "fine-tune":
        raise InvalidInputError(f"{field} {value} was uploaded with purpose {record.purpose!r}; upload it with purpose fine-tune "
                                "(its lines are checked as examples then)", param=field)
    return files.storage.url(record.path)


def fine_tune(
    config: FineTuneConfig,
    *,
    storage: Storage,
    engine: Engine,
    tenant: str | None = None,
    progress: Progress | None = None,
    endpoint_url: str | None = None,
) -> FineTuneResult:
    """Ingest the training file with the base's tokenizer, train, register; see the module docstring.

    Needs a Ray connection (`lmaas.cluster.connect`).

    Args:
        config: the fine-tune.
        storage, engine: the artifact store and metadata database.
        tenant: who it runs for (a queued job's tenant; None: the operator). The base and the files resolve as
            it sees them; the datasets and the result are its own.
        progress: called with each event (see the module docstring).
        endpoint_url: the S3-compatible endpoint of `s3://` file paths.

    Raises:
        everything `check_fine_tune`, `data.ingest.ingest` and `train.run.train` raise.
    """
    from lmaas.data.ingest import ingest
    from lmaas.train.run import train

    started = time.time()

    def emit(message: str, *, type_: str = "message", data: dict[str, Any] | None = None, level: str = "info") -> None:
        if progress is not None:
            progress({"type": type_, "level": level, "message": message, "data": data or {}, "created_at": time.time()})

    emit(f"Validating training file: {config.training_file}" + (f" and validation file: {config.validation_file}"
                                                                 if config.validation_file else ""))
    checked = _check(config, storage, engine, tenant)
    base, name = checked.base, config.result_name
    registry = ModelRegistry.configured(storage, engine)
    base_config = json.loads(registry.read_file(base.ref, "config.json", tenant=tenant)[1])
    context = base_config.get("max_position_embeddings") or base_config.get("n_positions") or MAX_BLOCK_SIZE
    block_size = min(config.block_size or MAX_BLOCK_SIZE, context)
    owner = tenant or "default"  # the operator's datasets belong to the default tenant, as `lmaas data ingest`'s do
    with tempfile.TemporaryDirectory(prefix="lmaas-finetune-") as tmp:
        tokenizer_dir = _tokenizer_dir(registry, base, tenant, Path(tmp))

        def ingest_file(source: str, split: str) -> Any:  # noqa: ANN401 - a DatasetVersion
            # every example trains (or, in the validation file, evaluates): no split of its own held out
            ingest_config = IngestConfig(name=_dataset_name(name, split), sources=[source], format="chat", tokenizer=str(tokenizer_dir),
                                         block_size=block_size, validation_percent=0.0)
            return ingest(ingest_config, storage=storage, engine=engine, endpoint_url=endpoint_url, tenant=owner).version

        dataset = ingest_file(checked.training_source, "train")
        validation = ingest_file(checked.validation_source, "valid") if checked.validation_source else None
    emit(f"Files validated: {dataset.train_rows} training examples ({dataset.ref})"
         + (f", {validation.train_rows} validation examples ({validation.ref})" if validation else "")
         + f", {block_size} tokens each at most", data={"training_examples": dataset.train_rows,
                                                        "validation_examples": validation.train_rows if validation else 0})

    train_config = config.train_config(examples=dataset.train_rows, dataset=dataset.ref)
    hyperparameters = {k: v for k, v in config.resolved_hyperparameters(dataset.train_rows).items() if k != "per_worker_batch_size"}
    total = train_config.max_steps
    emit(f"Fine-tuning job started: {config.method} on {base.ref}, {hyperparameters['n_epochs']} epochs, batch size "
         f"{hyperparameters['batch_size']}, learning rate {train_config.lr:.2e}, {total} steps",
         data={"hyperparameters": hyperparameters, "total_steps": total})

    def on_metrics(m: dict[str, Any]) -> None:
        data = {"step": m["step"], "total_steps": total, "train_loss": m["loss"], "learning_rate": m["lr"],
                "tokens_per_s": m["tokens_per_s"], **({"valid_loss": m["val_loss"]} if "val_loss" in m else {})}
        emit(f"Step {m['step']}/{total}: training loss={m['loss']:.4f}", type_="metrics", data=data)
        if m["step"] % train_config.checkpoint_interval == 0 or m["step"] == total:  # the training loop checkpoints there
            emit(f"Checkpoint created at step {m['step']}", data={"step": m["step"]})

    trained = train(train_config, storage=storage, engine=engine, tenant=tenant, progress=on_metrics)
    version = trained.model_version
    assert version is not None  # output_model is always set
    metrics = {k: v for k, v in trained.metrics.items() if isinstance(v, (int, float))}
    if validation is not None:
        emit(f"Evaluating on the validation file ({min(validation.train_rows, VALIDATION_ROWS)} examples)")
        metrics.update(validation_metrics(storage, engine, base.ref, version, validation, tenant=tenant))
    checkpoints = _checkpoints(storage, trained.run_id, version.ref)
    emit(f"New fine-tuned model created: {version.ref}", data={"fine_tuned_model": version.ref, "metrics": metrics})
    result = FineTuneResult(
        model_version=version, base=base.ref, run_id=trained.run_id, dataset=dataset.ref, hyperparameters=hyperparameters,
        metrics=metrics, history=trained.history, checkpoints=checkpoints, trained_tokens=int(trained.metrics.get("tokens", 0)),
        seconds=time.time() - started, validation_dataset=validation.ref if validation else None,
    )
    emit("The job has successfully completed")
    return result


def _dataset_name(output: str, split: str) -> str:
    """The dataset a fine-tune's file is ingested as: `<output name>-<split>` (a valid dataset name)."""
    return f"{output[: 99 - len(split)]}-{split}"


def _tokenizer_dir(registry: ModelRegistry, base: ModelVersion, tenant: str | None, directory: Path) -> Path:
    """The base's tokenizer files (and chat template) in `directory`, each file's sha256 checked as it is read."""
    present = {f.path for f in base.files}
    for name in (*TOKENIZER_FILES, "chat_template.jinja"):  # transformers' own file for a template, beside tokenizer_config.json
        if name in present:
            (directory / name).write_bytes(registry.read_file(base.ref, name, tenant=tenant)[1])
    return directory


def _checkpoints(storage: Storage, run_id: str, registered: str) -> list[dict[str, Any]]:
    """The run's kept checkpoints, oldest first, each with the metrics of its step."""
    from lmaas.train import checkpoint
    from lmaas.train.run import RUNS_PREFIX

    found = []
    for path in storage.list(f"{RUNS_PREFIX}/{run_id}"):
        if not path.endswith(f"/{checkpoint.STATE_FILE}"):
            continue
        state = checkpoint.parse_state(storage.read_text(path))
        last = state.history[-1] if state.history else {}
        metrics = {"step": state.step, "train_loss": last.get("loss"), **({"valid_loss": last["val_loss"]} if "val_loss" in last else {})}
        found.append({"step": state.step, "metrics": metrics, "directory": path.split("/")[-2]})
    found.sort(key=lambda c: c["step"])
    for point in found:
        point["checkpoint"] = f"{run_id}/{point.pop('directory')}"
    if found:
        found[-1]["checkpoint"] = registered
    return found


def validation_metrics(storage: Storage, engine: Engine, base_ref: str, tuned: ModelVersion, dataset: Any, *,
                       tenant: str | None = None) -> dict[str, float]:
    """Mean loss and next-token accuracy over the answer tokens of a chat dataset's first `VALIDATION_ROWS` examples,
    of the base (`base_valid_*`) and of the fine-tuned model (`full_valid_*`, as OpenAI names them), on this process's
    GPU if it has one."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from lmaas.data.feed import shard_paths

    filesystem, _ = storage.pyarrow_filesystem()
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    for path in shard_paths(dataset, storage, "train"):
        table = pq.read_table(path, filesystem=filesystem, columns=["input_ids", "labels"])
        ids += table.column("input_ids").to_pylist()
        labels += table.column("labels").to_pylist()
        if len(ids) >= VALIDATION_ROWS:
            break
    device = "cuda" if torch.cuda.is_available() else "cpu"
    input_ids, targets = torch.tensor(ids[:VALIDATION_ROWS], device=device), torch.tensor(labels[:VALIDATION_ROWS], device=device)
    registry = ModelRegistry.configured(storage, engine)
    with tempfile.TemporaryDirectory(prefix="lmaas-finetune-eval-") as tmp:
        registry.download(base_ref, Path(tmp) / "base", tenant=tenant)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "base").to(device)
        before = _answer_metrics(model, input_ids, targets)
        registry.download(tuned.ref, Path(tmp) / "tuned", tenant=tenant)
        if tuned.task == "adapter":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(Path(tmp) / "tuned")).to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "tuned").to(device)
        after = _answer_metrics(model, input_ids, targets)
    return {"full_valid_loss": after[0], "full_valid_mean_token_accuracy": after[1],
            "base_valid_loss": before[0], "base_valid_mean_token_accuracy": before[1]}


def _answer_metrics(model: Any, ids: Any, labels: Any) -> tuple[float, float]:  # noqa: ANN401 - torch objects
    """(mean cross entropy, greedy accuracy) over every answer token (label not -100), token-weighted across rows."""
    import torch
    import torch.nn.functional as F

    from lmaas.data.chat import IGNORE

    batch = max(1, 1024 // ids.shape[1])  # logits are tokens x vocabulary floats: ~0.5 GB a forward for a 128k vocabulary
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=ids[i : i + batch]).logits[:, :-1].float()
            target = labels[i : i + batch, 1:]
            mask = target != IGNORE
            loss_sum += F.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            count += int(mask.sum())
    if count == 0:
        raise InvalidInputError("the validation file has no answer tokens within the block size", param="validation_file")
    return loss_sum / count, correct / count
