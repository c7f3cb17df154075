"""The driver side of a training run: check, launch a `TorchTrainer`, register the result.

    result = train(config, storage=storage, engine=engine, progress=print)
    result.model_version   # the registered ModelVersion (None when output_model is None)

A run lives under `runs/<run id>/` in the artifact store: Ray Train's checkpoints
(`checkpoint_*`, the last `keep_checkpoints` kept), `run.json` (config, dataset, status,
metrics) and `loss.png` (which the registered version carries too). `train(config, resume=RUN)`
continues a run from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from lmaas.data import tokenizer as tok
from lmaas.data.feed import training_dataset
from lmaas.data.versions import DatasetVersion, get_version
from lmaas.errors import InvalidInputError, JobFailedError, NotFoundError
from lmaas.models import build_model, config_from_dict, model_config, parameter_count
from lmaas.models.hf import ARCHITECTURES
from lmaas.registry import ModelRegistry, ModelVersion
from lmaas.storage import Storage
from lmaas.train import checkpoint
from lmaas.train.config import TrainConfig
from lmaas.train.plot import loss_curve_png

RUNS_PREFIX = "runs"
RUN_FILE = "run.json"
LOSS_CURVE = "loss.png"
FAULT_ENV = "LMAAS_FAULT_KILL_RANK_AT"
"""Chaos testing: `RANK:STEP:MARKER` kills worker RANK with SIGKILL at STEP, once (MARKER records it)."""

KEEP_SHARD_BYTES = 256 << 20
"""A worker whose training shard is at most this big keeps it in memory after the first epoch and
replays it (`loop._batches`), instead of a Ray Data execution per epoch (measured: a 66-example chat
set re-streamed every 4 steps trained at a third of the tokens/s of a large corpus)."""

DATA_CPUS = 1.0
"""CPUs a training run leaves free for the Ray Data tasks that read and feed its shards."""

Progress = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """A finished run."""

    run_id: str
    run_uri: str
    checkpoint_uri: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    parameters: int
    seconds: float
    model_version: ModelVersion | None = None


def new_run_id(config: TrainConfig) -> str:
    return f"{config.output_model or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def read_run(storage: Storage, run_id: str) -> dict[str, Any]:
    """The `run.json` record of a run.

    Raises:
        NotFoundError: no such run in this store.
    """
    path = f"{RUNS_PREFIX}/{run_id}/{RUN_FILE}"
    if "/" in run_id or not run_id or not storage.exists(path):
        raise NotFoundError(f"run {run_id!r} not found in {storage.url(RUNS_PREFIX)}", param="resume")
    return json.loads(storage.read_text(path))


def list_runs(storage: Storage) -> list[dict[str, Any]]:
    """Every run record in the store, newest first."""
    records = []
    for path in storage.list(RUNS_PREFIX):
        if path.endswith(f"/{RUN_FILE}"):
            records.append(json.loads(storage.read_text(path)))
    return sorted(records, key=lambda r: r.get("started_at", 0), reverse=True)


def check_resources(config: TrainConfig, resources: dict[str, float]) -> None:
    """Refuse a worker group the cluster can never hold (before any worker starts).

    Raises:
        InvalidInputError: not enough CPUs or GPUs in the whole cluster.
    """
    cpus = config.num_workers * config.cpus_per_worker
    total = resources.get("CPU", 0.0)
    if cpus > total:
        raise InvalidInputError(
            f"num_workers={config.num_workers} x cpus_per_worker={config.cpus_per_worker} needs {cpus:g} CPUs; "
            f"the cluster has {total:g}",
            param="num_workers",
        )
    if total - cpus < DATA_CPUS:
        # measured: with half a CPU left, the Ray Data tasks that stream the shards never got scheduled
        raise InvalidInputError(
            f"num_workers={config.num_workers} x cpus_per_worker={config.cpus_per_worker} leaves {total - cpus:g} of "
            f"{total:g} CPUs for the Ray Data tasks that feed the workers; leave at least {DATA_CPUS:g} "
            f"(lower cpus_per_worker: threads_per_worker sets the threads each worker uses)",
            param="cpus_per_worker",
        )
    for name, amount in config.resources_per_worker.items():
        if config.num_workers * amount > resources.get(name, 0.0):
            raise InvalidInputError(
                f"resources_per_worker {name}={amount:g} x {config.num_workers} workers needs {config.num_workers * amount:g}; "
                f"the cluster has {resources.get(name, 0.0):g} (start nodes with `ray start --resources '{{\"{name}\": N}}'`)",
                param="resources_per_worker",
            )
    if config.use_gpu and config.num_workers > resources.get("GPU", 0.0):
        raise InvalidInputError(
            f"use_gpu with num_workers={config.num_workers} needs {config.num_workers} GPUs; the cluster has {resources.get('GPU', 0.0):g}",
            param="use_gpu",
        )


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's controller poll interval; read when `fit()` starts its controller."""


@contextlib.contextmanager
def _poll_interval(seconds: float):
    """`POLL_ENV` set to `seconds` while a trainer starts, unless the environment already sets it."""
    if POLL_ENV in os.environ:
        yield
        return
    os.environ[POLL_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(POLL_ENV, None)


def train(
    config: TrainConfig,
    *,
    storage: Storage,
    engine: Engine,
    resume: str | None = None,
    progress: Progress | None = None,
    model_overrides: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
    register: bool = True,
    tenant: str | None = None,
) -> TrainResult:
    """Run one training job on the connected Ray cluster and register its final model.

    Args:
        config: the run's settings (already validated).
        storage: artifact store for the run's checkpoints and the registered model.
        engine: metadata database (datasets, registry).
        resume: id of an earlier run to continue from its latest checkpoint.
        progress: called on the driver with each metrics report of rank 0.
        model_overrides: `LlamaConfig` fields that change the named size `config.model`
            (e.g. `num_hidden_layers`), applied after the dataset's vocabulary and block size.
        teacher: distill instead of plain training (see `lmaas.compress.distill`): where each worker
            loads the frozen teacher from (`storage_uri`, `endpoint_url`, `prefix`,
            `manifest_sha256`, `ref`) and the loss's `temperature` and `alpha`.
        register: register the final checkpoint as `config.output_model` (distillation evaluates
            and registers it itself).
        tenant: who the run acts for (a queued job's tenant; None: the operator). The dataset and
            `init_from` resolve as this tenant sees them, and `output_model` must be free or its own
            (checked before training starts).

    Raises:
        NotFoundError: the dataset or the resumed run does not exist (or `tenant` may not see it).
        AlreadyExistsError / PermissionDeniedError: `output_model` belongs to another tenant.
        InvalidInputError: the cluster cannot hold the workers.
        JobFailedError: training failed after `max_failures` restarts.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    started = time.time()
    check_resources(config, ray.cluster_resources())
    version = get_version(engine, config.dataset, tenant=tenant)
    if register and config.output_model:
        ModelRegistry.configured(storage, engine).check_writable(config.output_model, tenant=tenant, create=True, param="output_model")
    if resume is not None:
        read_run(storage, resume)
    run_id = resume or new_run_id(config)
    run_prefix = f"{RUNS_PREFIX}/{run_id}"
    tokenizer_files, spec = _tokenizer(storage, version)
    init = _init_from(config, storage, engine, version, tenant) if config.init_from else None
    if init is not None:
        llama = config_from_dict(init.pop("config"))
    else:
        llama = model_config(config.model, vocab_size=spec.vocab_size, max_seq_len=version.block_size, eos_id=spec.eos_id,
                             **(model_overrides or {}))
    import torch

    with torch.device("meta"):
        meta_model = build_model(llama, seed=None)
        parameters = parameter_count(meta_model)
        if config.method == "lora":
            from lmaas.train import lora

            trainable = lora.trainable_parameters(lora.wrap(meta_model, config.lora, base_ref=init["ref"]))
        else:
            trainable = parameters
    record: dict[str, Any] = {
        "run_id": run_id,
        "status": "running",
        "started_at": started,
        "config": config.model_dump(),
        "dataset": version.ref,
        "dataset_content_hash": version.content_hash,
        "parameters": parameters,
        "trainable_parameters": trainable,
        "resumed": resume is not None,
        **({"model_overrides": model_overrides} if model_overrides else {}),
        **({"teacher": {k: teacher[k] for k in ("ref", "temperature", "alpha")}} if teacher else {}),
        **({"init_from": init["ref"]} if init else {}),
    }
    storage.write_text(f"{run_prefix}/{RUN_FILE}", json.dumps(record, indent=1))

    datasets = {"train": training_dataset(version, storage, "train")}
    validation = _validation_rows(version, storage, config.eval_batches * config.batch_size * config.num_workers)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": _on_this_node()}) if progress else None
    loop_config = {
        "config": config.model_dump(),
        "model_config": llama.to_dict(),
        "tokenizer_files": tokenizer_files,
        "validation": validation,
        "progress": queue,
        "fault": _fault_from_env(),
        "teacher": teacher,
        "init": init,
        "run_id": run_id,
        # int64 ids and labels (counted for every dataset: chat ones have them), decided here so all ranks agree
        "keep_shard": version.train_rows * version.block_size * 16 / config.num_workers <= KEEP_SHARD_BYTES,
    }
    filesystem, root = storage.pyarrow_filesystem()
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {}), **config.resources_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker=_train_func(),
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_id,
            storage_path=f"{root}/{RUNS_PREFIX}",
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
    )
    watcher = _ProgressWatcher(queue, progress) if queue is not None else None
    try:
        with _poll_interval(config.poll_interval_s):
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray raises its own error types; the run record keeps the cause
        reason = _one_line(exc)
        storage.write_text(f"{run_prefix}/{RUN_FILE}", json.dumps({**record, "status": "failed", "error": reason}, indent=1))
        raise JobFailedError(f"training run {run_id} failed: {reason} (resume with --resume {run_id})") from None
    finally:
        if watcher is not None:
            watcher.stop()
        if queue is not None:
            queue.shutdown()

    if result.checkpoint is None:
        raise JobFailedError(f"training run {run_id} finished without a checkpoint")
    checkpoint_prefix = f"{run_prefix}/{Path(result.checkpoint.path).name}"
    # only the small state file: the weights are read once, by register_run
    state = checkpoint.parse_state(storage.read_text(f"{checkpoint_prefix}/{checkpoint.STATE_FILE}"))
    final = dict(state.history[-1]) if state.history else {}
    storage.write_bytes(f"{run_prefix}/{LOSS_CURVE}", loss_curve_png(state.history, title=run_id))
    record.update(
        status="finished",
        finished_at=time.time(),
        seconds=time.time() - started,
        metrics=final,
        checkpoint=storage.url(checkpoint_prefix),
        checkpoint_prefix=checkpoint_prefix,
        model=None,
    )
    storage.write_text(f"{run_prefix}/{RUN_FILE}", json.dumps(record, indent=1))
    registered = None
    if register and config.output_model:
        registered = register_run(storage, engine, run_id, config.output_model, alias=config.alias, tenant=tenant)
    return TrainResult(
        run_id=run_id,
        run_uri=storage.url(run_prefix),
        checkpoint_uri=storage.url(checkpoint_prefix),
        metrics=final,
        history=state.history,
        parameters=parameters,
        seconds=time.time() - started,
        model_version=registered,
    )


def _init_from(config: TrainConfig, storage: Storage, engine: Engine, dataset: Any, tenant: str | None) -> dict[str, Any]:
    """Where the workers load the base model of a fine-tune from, and its architecture (`config`).

    Raises:
        NotFoundError: no such model version.
        InvalidInputError: not an unquantized causal LM of `hf.ARCHITECTURES`, encrypted, a context
            shorter than the dataset's rows, a dataset tokenized with another tokenizer, or a QLoRA
            base where bitsandbytes is missing.
    """
    registry = ModelRegistry.configured(storage, engine)
    base = registry.resolve(config.init_from, tenant=tenant)
    registry.check_signature(base)
    if base.task != "causal-lm":
        raise InvalidInputError(f"init_from {base.ref} is a {base.task} model; fine-tuning starts from a causal-lm", param="init_from")
    if base.encrypted:
        raise InvalidInputError(f"init_from {base.ref} is encrypted at rest; workers read its files directly", param="init_from")
    _, raw = registry.read_file(base.ref, "config.json")
    base_config = json.loads(raw)
    if base_config.get("quantization_config") or base_config.get("model_type") not in ARCHITECTURES.values():
        raise InvalidInputError(f"init_from {base.ref} is a {base_config.get('model_type')} model"
                                f"{' (quantized)' if base_config.get('quantization_config') else ''}; fine-tuning supports "
                                f"unquantized {', '.join(ARCHITECTURES.values())} models (fine-tune the fp32 parent of a "
                                "quantized variant)", param="init_from")
    context = base_config.get("max_position_embeddings") or base_config.get("n_positions") or 0
    if context < dataset.block_size:
        raise InvalidInputError(f"dataset {dataset.ref} has {dataset.block_size}-token rows, longer than {base.ref}'s context "
                                f"({context})", param="dataset")
    if config.lora.quantize_base == "nf4":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise InvalidInputError("lora.quantize_base nf4 (QLoRA) needs bitsandbytes (`pip install bitsandbytes` on the GPU "
                                    "nodes); set quantize_base: none to train the adapter on the base's own dtype",
                                    param="lora.quantize_base")
    check_dataset_tokenizer(registry, base, base_config, dataset, role="init_from",
                            remedy=f"ingest with `--tokenizer` set to {base.ref}'s exported directory")
    return {"ref": base.ref, "storage_uri": storage.uri, "endpoint_url": storage.endpoint_url, "prefix": base.prefix,
            "manifest_sha256": base.manifest_sha256, "config": base_config}


def check_dataset_tokenizer(registry: ModelRegistry, model: ModelVersion, model_config: dict[str, Any], dataset: Any, *,
                            role: str, remedy: str) -> int:
    """The shared vocabulary size; refuses a dataset tokenized differently from `model`'s tokenizer.

    Raises:
        NotFoundError: the dataset has no tokenizer.json.
        InvalidInputError: other vocabulary size or other tokens (`role` and `remedy` go into the message).
    """
    from tokenizers import Tokenizer

    path = f"{dataset.prefix}/tokenizer/tokenizer.json"
    if not registry.storage.exists(path):
        raise NotFoundError(f"dataset {dataset.ref} has no tokenizer.json", param="dataset")
    data_tok = Tokenizer.from_str(registry.storage.read_text(path))
    vocab = model_config.get("vocab_size")
    if data_tok.get_vocab_size() != vocab:
        raise InvalidInputError(f"dataset {dataset.ref}'s tokenizer has {data_tok.get_vocab_size()} tokens, {role} {model.ref} "
                                f"has vocab_size {vocab}: {remedy}", param="dataset")
    if any(f.path == "tokenizer.json" for f in model.files):
        _, raw = registry.read_file(model.ref, "tokenizer.json")
        if Tokenizer.from_str(raw.decode()).get_vocab() != data_tok.get_vocab():
            raise InvalidInputError(f"dataset {dataset.ref} was tokenized with a different tokenizer than {role} {model.ref}'s "
                                    f"(same size, other tokens): {remedy}", param="dataset")
    return vocab


def register_run(storage: Storage, engine: Engine, run_id: str, name: str, *, alias: str | None = None,
                 tenant: str | None = None) -> ModelVersion:
    """Register the final checkpoint of a finished run as the next version of `name`.

    The version records its lineage: dataset `name:N` and content hash, the run id, the run's
    final metrics, and `lmaas_training.json` (the run's config) and `loss.png` among its files. It is signed
    and encrypted as the environment configures (`ModelRegistry.configured`).

    Args:
        tenant: who registers it (as for `ModelRegistry.register_version`; None: the operator).

    Raises:
        NotFoundError: no such run, or it has not finished.
    """
    with tempfile.TemporaryDirectory(prefix="lmaas-register-") as tmp:
        model_dir = Path(tmp)
        record = fetch_model(storage, run_id, model_dir)
        config = TrainConfig(**record["config"])
        final = record.get("metrics") or {}
        metrics = {k: float(v) for k, v in final.items() if isinstance(v, (int, float)) and k not in ("epoch", "restarts")}
        metrics["parameters"] = float(record["parameters"])
        metrics["trainable_parameters"] = float(record.get("trainable_parameters", record["parameters"]))
        adapter = config.method == "lora"
        registry = ModelRegistry.configured(storage, engine)
        registered = registry.register_version(
            name,
            model_dir,
            task="adapter" if adapter else "causal-lm",
            dataset=record["dataset"],
            dataset_sha256=record["dataset_content_hash"],
            parent=record.get("init_from"),
            run=run_id,
            metrics=metrics,
            description=(f"LoRA adapter (r={config.lora.rank}) of {record['init_from']}" if adapter
                         else f"fine-tune of {record['init_from']}" if record.get("init_from") else f"{config.model} model")
            + f", {config.strategy} x{config.num_workers}, {final.get('step', 0)} steps on {record['dataset']}",
            tenant=tenant,
        )
    if alias:
        registry.set_alias(registered.name, alias, registered.version, tenant=tenant)
    record["model"] = f"{registered.name}:{registered.version}"
    storage.write_text(f"{RUNS_PREFIX}/{run_id}/{RUN_FILE}", json.dumps(record, indent=1))
    return registered


def fetch_model(storage: Storage, run_id: str, directory: str | Path) -> dict[str, Any]:
    """Copy the final checkpoint's model files of a finished run into `directory` (no optimizer
    state), plus `lmaas_training.json` (run, dataset, config) and the run's `loss.png`; returns
    the run record.

    Raises:
        NotFoundError: no such run, or it has not finished.
    """
    record = read_run(storage, run_id)
    if record.get("status") != "finished" or not record.get("checkpoint_prefix"):
        raise NotFoundError(f"run {run_id} has no final checkpoint (status {record.get('status')})", param="run")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for rel in checkpoint.MODEL_FILES:
        path = f"{record['checkpoint_prefix']}/{rel}"
        if storage.exists(path):
            storage.get_file(path, directory / rel)
    # the curve travels with the version, so whoever reads the version (the console) sees it
    if storage.exists(f"{RUNS_PREFIX}/{run_id}/{LOSS_CURVE}"):
        storage.get_file(f"{RUNS_PREFIX}/{run_id}/{LOSS_CURVE}", directory / LOSS_CURVE)
    lineage = {"run": run_id, "dataset": record["dataset"], "dataset_content_hash": record["dataset_content_hash"],
               "config": record["config"]}
    lineage.update({k: record[k] for k in ("model_overrides", "teacher") if k in record})
    (directory / "lmaas_training.json").write_text(json.dumps(lineage, indent=1))
    return record


def _on_this_node() -> Any:  # noqa: ANN401 - a Ray scheduling strategy
    """Keep a driver-side helper actor beside the driver, so losing a worker node does not take it along.

    Hard affinity: a soft one put 0-CPU actors on other nodes about half the time (measured, Ray 2.60);
    the driver's node is where Ray Train keeps its controller too.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _train_func():  # noqa: ANN202 - imported late: `ray.train` costs seconds to import
    from lmaas.train.loop import train_func

    return train_func


def _tokenizer(storage: Storage, version: DatasetVersion) -> tuple[dict[str, str], tok.TokenizerSpec]:
    """The dataset's tokenizer files (text) and spec."""
    with tempfile.TemporaryDirectory(prefix="lmaas-tok-") as tmp:
        files: dict[str, str] = {}
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            path = f"{version.prefix}/tokenizer/{name}"
            if storage.exists(path):
                files[name] = storage.read_text(path)
                (Path(tmp) / name).write_text(files[name])
        return files, tok.load_pretrained(tmp)


def _validation_rows(version: DatasetVersion, storage: Storage, rows: int) -> Any:
    """The fixed validation set every evaluation uses (the first `rows` rows), as a Ray object.

    Read once here rather than streamed in the workers: a second Ray Data pipeline beside the
    training shard's would compete with it for the few CPUs a small cluster leaves to data.
    """
    import ray

    if version.validation_rows == 0:
        return None
    batch = training_dataset(version, storage, "validation").limit(rows).take_batch(rows, batch_format="numpy")
    return ray.put({k: batch[k] for k in ("input_ids", "labels") if k in batch})


def _fault_from_env() -> dict[str, Any] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    rank, step, marker = raw.split(":", 2)
    return {"rank": int(rank), "step": int(step), "marker": marker}


def _one_line(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}"[:500]


class _ProgressWatcher:
    """Drain rank 0's metric reports from a Ray queue into the driver's callback."""

    def __init__(self, queue: Any, callback: Progress) -> None:
        self._queue, self._callback = queue, callback
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmaas-train-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._done.is_set():
            try:
                self._callback(self._queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - a dead queue ends progress, never the run
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        while True:  # what arrived after the last poll
            try:
                self._callback(self._queue.get_nowait())
            except Exception:  # noqa: BLE001 - Empty, or the queue is gone
                return
