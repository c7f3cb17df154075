"""Hyper-parameter sweeps: Ray Tune runs the same training job per trial and the best is registered.

    lmaas train jobs/configs/train_tiny_cpu.yaml --sweep jobs/configs/sweep_lr.yaml

Each trial is a full `train()` run (its own run id, checkpoints and run record, nothing
registered); when all have finished, the best trial by `metric` is registered as `output_model`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmaas.errors import InvalidInputError, JobFailedError
from lmaas.registry import ModelVersion
from lmaas.train.config import TrainConfig
from lmaas.train.run import DATA_CPUS, register_run

FIXED = {"dataset", "output_model", "alias"}


class SweepConfig(BaseModel):
    """A search over `TrainConfig` fields (YAML: `jobs/configs/sweep_*.yaml`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = "val_loss"
    """Final metric of each trial to compare (`val_loss`, `loss`, `tokens_per_s`, ...)."""

    mode: Literal["min", "max"] = "min"
    method: Literal["grid", "random"] = "grid"
    """`grid`: every combination of the listed values; `random`: `num_samples` draws."""

    num_samples: int = Field(default=1, ge=1)
    """Random trials, or repeats of the whole grid."""

    max_concurrent: int = Field(default=1, ge=1)
    """Trials running at once (each is a whole worker group)."""

    parameters: dict[str, list[Any] | dict[str, list[float]]]
    """Field -> list of values (grid or choice), or `{uniform: [lo, hi]}` / `{loguniform: [lo, hi]}`
    (random only)."""

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("name at least one TrainConfig field to search over")
        for name, space in value.items():
            if name not in TrainConfig.model_fields or name in FIXED:
                raise ValueError(f"{name!r} is not a searchable TrainConfig field")
            if isinstance(space, list) and not space:
                raise ValueError(f"{name}: list at least one value")
            if isinstance(space, dict) and (len(space) != 1 or next(iter(space)) not in ("uniform", "loguniform")
                                            or len(next(iter(space.values()))) != 2):
                raise ValueError(f"{name}: use a list of values, {{uniform: [lo, hi]}} or {{loguniform: [lo, hi]}}")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> "SweepConfig":
        if self.method == "grid" and any(isinstance(v, dict) for v in self.parameters.values()):
            raise ValueError("grid search needs lists of values; ranges need method: random")
        return self


@dataclass
class SweepResult:
    """Every trial's final metrics and the registered best."""

    trials: list[dict[str, Any]]
    best: dict[str, Any]
    model_version: ModelVersion | None
    seconds: float


def sweep(
    config: TrainConfig,
    search: SweepConfig,
    *,
    storage_uri: str,
    endpoint_url: str | None,
    database_url: str,
) -> SweepResult:
    """Run `search` over `config` with Ray Tune on the connected cluster; register the best trial.

    Raises:
        InvalidInputError: a trial's config would be invalid (checked for every grid point first).
        JobFailedError: no trial finished.
    """
    from ray import tune

    from lmaas import db
    from lmaas.storage import Storage

    import ray

    started = time.time()
    total = ray.cluster_resources().get("CPU", 0.0)
    held = config.num_workers * config.cpus_per_worker * search.max_concurrent
    if total - held < DATA_CPUS + 0.5:
        # measured on 2 CPUs: trials of 2 x 0.5-CPU workers stalled waiting for their data; 2 x 0.25 ran
        raise InvalidInputError(
            f"{search.max_concurrent} trial(s) of num_workers={config.num_workers} x cpus_per_worker="
            f"{config.cpus_per_worker} leave {total - held:g} of {total:g} CPUs for the data feed; a sweep needs "
            f"{DATA_CPUS + 0.5:g} (lower cpus_per_worker or max_concurrent)",
            param="cpus_per_worker",
        )
    space = {name: _domain(tune, space, search.method) for name, space in search.parameters.items()}
    if search.method == "grid":
        for combo in itertools.product(*search.parameters.values()):
            _trial_config(config, dict(zip(search.parameters, combo)))
    base = config.model_dump()

    def trial(params: dict[str, Any]) -> None:
        from lmaas.train.run import train

        storage = Storage(storage_uri, endpoint_url=endpoint_url)
        result = train(_trial_config(TrainConfig(**base), params), storage=storage, engine=db.connect(database_url))
        numbers = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
        tune.report({**numbers, "run_id": result.run_id})

    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0.01}),  # the trial only drives; its Ray Train workers hold the CPUs
        param_space=space,
        tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                    max_concurrent_trials=search.max_concurrent),
        run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", verbose=0),
    )
    grid = tuner.fit()
    trials = [dict(r.metrics or {}, config=r.config) for r in grid if r.error is None and r.metrics]
    if not trials or not any(search.metric in t for t in trials):
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None]
        raise JobFailedError(f"no sweep trial reported {search.metric}" + (f": {errors[0]}" if errors else ""))
    ranked = sorted((t for t in trials if search.metric in t), key=lambda t: t[search.metric], reverse=search.mode == "max")
    best = ranked[0]
    registered = None
    if config.output_model:
        storage = Storage(storage_uri, endpoint_url=endpoint_url)
        registered = register_run(storage, db.connect(database_url), best["run_id"], config.output_model, alias=config.alias)
    return SweepResult(trials=trials, best=best, model_version=registered, seconds=time.time() - started)


def _trial_config(config: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**{**config.model_dump(), **params, "output_model": None, "alias": None})
    except ValueError as exc:
        raise InvalidInputError(f"sweep trial {params}: {str(exc).splitlines()[-1].strip()}", param="sweep") from None


def _domain(tune: Any, space: Any, method: str) -> Any:
    if isinstance(space, dict):
        kind, (low, high) = next(iter(space.items()))
        return tune.loguniform(low, high) if kind == "loguniform" else tune.uniform(low, high)
    return tune.grid_search(space) if method == "grid" else tune.choice(space)
