"""Model merging as registry operations: registered versions in, one measured child version out.

    from lmaas.compress.merge import MergeConfig, merge, merge_adapter
    merge(MergeConfig(method="linear", models=["code-a", "code-b"], output_model="code-soup"), registry)
    merge(MergeConfig(method="ties", models=["code-a", "code-b"], base="tiny-lm:1", density=0.5), registry)
    merge_adapter("my-lora:2", "my-model", registry)          # PEFT merge_and_unload, a standalone causal LM

Weight merges combine two or more causal LMs of one architecture, tensor by tensor:

- `linear`: the weighted average (a model soup); weights are normalized to sum 1.
- `slerp`: spherical interpolation of exactly two models at `t` (0 gives the first, 1 the second).
- `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`: on task vectors (model - `base`), combined
  by PEFT's `peft.utils.merge_utils` (TIES trims each vector to its `density` largest magnitudes and
  elects a sign; DARE drops entries at random, seeded, and rescales) and added back to `base`.

Every input is checked before anything is merged: visible to the caller's tenant, a causal LM, not
quantized, the same architecture (`ARCHITECTURE_FIELDS` of `config.json`), the same tensor names and
shapes, and the same tokenizer vocabulary. The merge keeps the first model's `config.json` and
tokenizer, writes `merge.json` (method, parameters, parents and the measured report) and is
registered as `task: causal-lm` with every input (and the base) as its `parents`, the report's
numbers as metrics. The report measures held-out loss and perplexity of the merge and of every
parent on each parent's held-out data (its dataset's validation split, else a fixed stdlib sample:
`evaluate.held_out_data`), so "does the merge keep both tasks" is answered where it is registered.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmaas.errors import InvalidInputError, JobFailedError
from lmaas.registry.refs import NAME_RE

if TYPE_CHECKING:
    import torch

    from lmaas.compress.evaluate import EvalData
    from lmaas.registry import ModelRegistry, ModelVersion

MERGE_FILE = "merge.json"
METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
Method = Literal["linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
"""Methods that merge task vectors (model - base) and so need `base`."""
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")

ARCHITECTURE_FIELDS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "tie_word_embeddings", "hidden_act", "rope_theta",
    "rope_scaling", "rms_norm_eps", "attention_bias", "mlp_bias", "n_embd", "n_layer", "n_head", "n_inner",
    "activation_function", "layer_norm_epsilon",
)
"""`config.json` fields that must be equal in every merged model: those that shape the weights, and those that
decide what the same weights compute (head split, activation, RoPE, norm epsilon). Tensor shapes are checked too."""

MODEL_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")
"""Files copied from the first model into the merge beside the new weights (whichever it has)."""

Progress = Callable[[str], None]


class MergeConfig(BaseModel):
    """One weight merge of registered causal LMs (YAML: `jobs/configs/merge_*.yaml`, `--set key=value` overrides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = "linear"
    """`linear`, `slerp`, `task_arithmetic`, `ties`, `dare_linear` or `dare_ties` (see the module docstring)."""

    models: list[str] = Field(default_factory=list)
    """The models to merge (`name`, `name:N`, `name@alias`), in order: the first gives the merge its
    `config.json` and tokenizer. Two or more for `linear` (the same one twice is allowed), exactly two
    for `slerp`, one or more for the task-vector methods."""

    weights: list[float] | None = None
    """One per model. `linear`: relative weights, normalized to sum 1 (default: equal). Task-vector methods:
    the scale of each task vector (default 1.0 each; negative subtracts a task). Not used by `slerp`."""

    base: str | None = None
    """The model the others were fine-tuned from; task vectors are model - base. Needed by `task_arithmetic`,
    `ties`, `dare_linear` and `dare_ties`; not used by `linear` and `slerp`."""

    density: float = Field(default=0.5, gt=0, le=1)
    """`ties`, `dare_*`: the share of each task vector kept (TIES: its largest magnitudes; DARE: at random)."""

    majority_sign: Literal["total", "frequency"] = "total"
    """`ties`, `dare_ties`: elect each entry's sign by the summed values (`total`) or by the count of signs."""

    t: float = Field(default=0.5, ge=0, le=1)
    """`slerp`: where between the two models (0: the first, 1: the second)."""

    seed: int = 0
    """`dare_*`: seed of the random drop (the same seed gives the same merge)."""

    output_model: str | None = None
    """Registry name of the merge; default `<first model's name>-<method>` (a new model, so no parent's name
    starts resolving to the merge)."""

    alias: str | None = None
    """Alias to point at the merged version once registered."""

    eval_tokens: int = Field(default=8192, ge=64)
    """Held-out tokens per evaluation set (each parent's validation split, else a fixed text sample)."""

    eval_seq_len: int = Field(default=128, ge=8)

    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads for the run (None: torch's default)."""

    @field_validator("output_model")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.fullmatch(value):
            raise ValueError(f"output_model {value!r} must match {NAME_RE.pattern} (lowercase letters, digits, . _ -)")
        return value

    @model_validator(mode="after")
    def _method_fits(self) -> "MergeConfig":
        given = self.model_fields_set
        count = len(self.models)
        if self.method == "slerp" and count != 2:
            raise ValueError(f"slerp interpolates exactly two models; got {count}")
        if self.method == "linear" and count < 2:
            raise ValueError(f"linear averages two or more models; got {count} (the same model twice is allowed)")
        if count < 1:
            raise ValueError(f"{self.method} needs at least one model in models")
        if self.method in TASK_VECTOR_METHODS and not self.base:
            raise ValueError(f"{self.method} merges task vectors (model - base): set base to the model they were fine-tuned from")
        if self.method not in TASK_VECTOR_METHODS and self.base:
            raise ValueError(f"{self.method} does not use a base; leave base unset (or use task_arithmetic, ties or dare_*)")
        if "density" in given and self.method not in DENSITY_METHODS:
            raise ValueError(f"density applies to {', '.join(DENSITY_METHODS)}, not {self.method}")
        if "t" in given and self.method != "slerp":
            raise ValueError(f"t applies to slerp, not {self.method}; linear takes weights")
        if self.weights is not None:
            if self.method == "slerp":
                raise ValueError("slerp takes t (where between the two models), not weights")
            if len(self.weights) != count:
                raise ValueError(f"weights has {len(self.weights)} values for {count} models; give one per model")
            if not all(math.isfinite(w) for w in self.weights):
                raise ValueError(f"weights must be finite numbers, got {self.weights}")
            if self.method == "linear" and (min(self.weights) < 0 or sum(self.weights) <= 0):
                raise ValueError(f"linear weights must be non-negative with a positive sum, got {self.weights}")
        return self

    def merge_weights(self) -> list[float]:
        """The weight of each model as applied (`linear`: normalized to sum 1; `slerp`: `[1 - t, t]`)."""
        if self.method == "slerp":
            return [1 - self.t, self.t]
        if self.method == "linear":
            raw = self.weights or [1.0] * len(self.models)
            return [w / sum(raw) for w in raw]
        return list(self.weights or [1.0] * len(self.models))

    def parameters(self) -> dict[str, Any]:
        """The method's own parameters, as recorded with the merge."""
        if self.method == "slerp":
            return {"t": self.t}
        params: dict[str, Any] = {"weights": self.merge_weights()}
        if self.method in DENSITY_METHODS:
            params["density"] = self.density
        if self.method in ("ties", "dare_ties"):
            params["majority_sign"] = self.majority_sign
        if self.method in ("dare_linear", "dare_ties"):
            params["seed"] = self.seed
        return params


@dataclass(frozen=True)
class MergeResult:
    """The registered merge and its report (also in the version's `merge.json`)."""

    version: "ModelVersion"
    report: dict[str, Any]


@dataclass(frozen=True)
class MergeInputs:
    """What `check_merge` resolved: the models in order (repeats kept), the base, and each version's `config.json`."""

    models: list["ModelVersion"]
    base: "ModelVersion | None"
    configs: dict[str, dict[str, Any]]
    output_model: str

    @property
    def distinct(self) -> list["ModelVersion"]:
        """Every input version once, models first, then the base."""
        return _distinct(self.models, self.base)


def _distinct(models: list["ModelVersion"], base: "ModelVersion | None") -> list["ModelVersion"]:
    return list({v.ref: v for v in [*models, *([base] if base else [])]}.values())


def _acting(registry: "ModelRegistry", tenant: str | None) -> "ModelRegistry":
    """The registry every step uses: acting for `tenant` (unless it already acts for one, which then wins), so each
    resolve, download, dataset read and registration sees and writes only what that tenant may."""
    return registry if tenant is None or registry.tenant is not None else registry.acting_for(tenant)


def check_merge(config: MergeConfig, registry: "ModelRegistry", *, tenant: str | None = None) -> MergeInputs:
    """Resolve a weight merge's inputs and refuse what cannot be merged, before downloading any weights.

    Args:
        config: the merge.
        registry: where the inputs are and the merge goes.
        tenant: the caller's tenant (None: an admin); it may merge its own and public models only.

    Returns:
        The resolved inputs.

    Raises:
        NotFoundError: a reference does not resolve (or names another tenant's private model: the same message).
        AlreadyExistsError / PermissionDeniedError: the output model is another tenant's.
        InvalidInputError: an input that is not a causal LM, is quantized, or differs from the first model's
            architecture (naming the `config.json` field).
    """
    registry = _acting(registry, tenant)
    models = [registry.resolve(ref) for ref in config.models]
    base = registry.resolve(config.base) if config.base else None
    output = config.output_model or f"{models[0].name}-{config.method.replace('_', '-')}"
    registry.check_writable(output, create=True, param="output_model")
    configs: dict[str, dict[str, Any]] = {}
    for version in _distinct(models, base):
        param = "models" if version.ref in {m.ref for m in models} else "base"
        if version.task == "adapter":
            raise InvalidInputError(f"{version.ref} is a LoRA adapter; merge it into its base first (lmaas models merge-adapter "
                                    f"{version.ref}), then merge the result", param=param)
        if version.task != "causal-lm":
            raise InvalidInputError(f"{version.ref} is a {version.task} model; merges combine causal-lm versions", param=param)
        configs[version.ref] = json.loads(registry.read_file(version.ref, "config.json")[1])
        _check_not_quantized(version, configs[version.ref], param)
        _check_architecture(models[0], configs[models[0].ref], version, configs[version.ref], param)
    return MergeInputs(models, base, configs, output)


def _check_not_quantized(version: "ModelVersion", config: dict[str, Any], param: str) -> None:
    if config.get("quantization_config"):
        raise InvalidInputError(f"{version.ref} is quantized; merge full-precision weights (its parent "
                                f"{version.parent or 'before quantization'}), then quantize the merge", param=param)


def _check_architecture(first: "ModelVersion", first_config: dict[str, Any], other: "ModelVersion", config: dict[str, Any],
                        param: str) -> None:
    for key in ARCHITECTURE_FIELDS:
        if first_config.get(key) != config.get(key):
            raise InvalidInputError(
                f"{other.ref} has {key} {config.get(key)!r} in config.json, {first.ref} has {first_config.get(key)!r}: "
                "merges need models of one architecture (fine-tuned from the same base)", param=param)


def merge(config: MergeConfig, registry: "ModelRegistry", *, tenant: str | None = None, progress: Progress | None = None,
          workdir: str | Path | None = None) -> MergeResult:
    """Merge `config.models` with `config.method`, measure the merge against every parent, register it.

    Args:
        config: the merge.
        registry: where the inputs are and the merge goes (its storage and engine also reach the datasets).
        tenant: the caller's tenant (None: an admin); it merges only models it may see, and the merge is its own.
        progress: called with a short line as each step starts.
        workdir: scratch directory (default: a temporary one, removed after).

    Returns:
        The registered version (`parents`: every model in order, then the base) and the report.

    Raises:
        NotFoundError, AlreadyExistsError, PermissionDeniedError, InvalidInputError: from `check_merge`, before any
            download; InvalidInputError also for different tensor names or shapes or different tokenizers (naming the
            first that differs), after the download and before anything is written to the registry.
    """
    say = progress or (lambda _line: None)
    registry = _acting(registry, tenant)
    inputs = check_merge(config, registry)
    scratch = Path(tempfile.mkdtemp(prefix="lmaas-merge-", dir=workdir))
    try:
        return _merge(config, registry, inputs, scratch, say)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _merge(config: MergeConfig, registry: "ModelRegistry", inputs: MergeInputs, scratch: Path, say: Progress) -> MergeResult:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    dirs: dict[str, Path] = {}
    for version in inputs.distinct:
        say(f"downloading {version.ref}")
        dirs[version.ref] = scratch / version.ref.replace(":", "-")
        registry.download(version.ref, dirs[version.ref])
    first = inputs.models[0]
    say(f"checking {len(inputs.distinct)} model(s): tensors and tokenizer")
    index = {ref: tensor_index(directory) for ref, directory in dirs.items()}
    for version in inputs.distinct[1:]:
        _check_same_tensors(first.ref, index[first.ref], version.ref, index[version.ref])
        _check_same_tokenizer(first.ref, dirs[first.ref], version.ref, dirs[version.ref])
    sets = _eval_sets(inputs.distinct, registry, dirs[first.ref], inputs.configs[first.ref], config.eval_tokens, config.eval_seq_len)

    out = scratch / "merged"
    out.mkdir()
    started = time.time()
    say(f"{config.method} merge of {', '.join(m.ref for m in inputs.models)}"
        + (f" onto {inputs.base.ref}" if inputs.base else "") + f" ({len(index[first.ref])} tensors)")
    tensors = merge_tensors(config, [index[m.ref] for m in inputs.models], index[inputs.base.ref] if inputs.base else None)
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    _copy_files(dirs[first.ref], out, MODEL_FILES + TOKENIZER_FILES)
    seconds = round(time.time() - started, 2)

    say("measuring the merge against every parent")
    from lmaas.compress.evaluate import weights_bytes

    evals = _measure(out, {v.ref: dirs[v.ref] for v in inputs.distinct}, sets)
    parents = [v.ref for v in inputs.distinct]
    report = {
        "method": config.method,
        "parameters": config.parameters(),
        "models": [m.ref for m in inputs.models],
        "base": inputs.base.ref if inputs.base else None,
        "parents": parents,
        "size_bytes": weights_bytes(out),
        "parent_size_bytes": weights_bytes(dirs[first.ref]),
        "seconds": seconds,
        "eval": evals,
    }
    (out / MERGE_FILE).write_text(json.dumps(report, indent=1))
    say(f"registering {inputs.output_model}")
    version = registry.register_version(
        inputs.output_model, out, task="causal-lm", parents=parents, run=f"merge-{config.method}", metrics=report_metrics(report),
        description=f"{config.method} merge {json.dumps(config.parameters())} of {', '.join(report['models'])}"
                    + (f" onto {report['base']}" if report["base"] else ""))
    if config.alias:
        registry.set_alias(version.name, config.alias, version.version)
    return MergeResult(version=version, report=report)


def merge_tensors(config: MergeConfig, models: list[dict[str, "TensorSource"]], base: dict[str, "TensorSource"] | None) -> dict[str, "torch.Tensor"]:
    """The merged state dict, one tensor at a time (each read from its file as it is needed).

    Floating tensors are combined in float32 and stored in the first model's dtype; other tensors
    (integer buffers) must be equal in every model and are kept.

    Args:
        config: method and parameters.
        models: each model's tensors by name (one entry per `config.models`, repeats included).
        base: the base's tensors (task-vector methods).

    Raises:
        InvalidInputError: a non-floating tensor that differs between the models.
    """
    import torch
    from peft.utils import merge_utils

    weights = torch.tensor(config.merge_weights(), dtype=torch.float32)
    merged: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(config.seed)  # DARE's random drop: the same seed gives the same merge
        warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")  # density 1: keep all
        for name in sorted(models[0]):
            originals = [m[name].load() for m in models]
            if not originals[0].is_floating_point():
                if any(not torch.equal(originals[0], o) for o in originals[1:]):
                    raise InvalidInputError(f"tensor {name} ({originals[0].dtype}) differs between the models and cannot be averaged",
                                            param="models")
                merged[name] = originals[0]
                continue
            values = [o.float() for o in originals]
            if config.method == "linear":
                result = merge_utils.task_arithmetic(values, weights)
            elif config.method == "slerp":
                result = slerp(config.t, values[0], values[1])
            else:
                assert base is not None
                origin = base[name].load().float()
                vectors = [v - origin for v in values]
                if config.method == "task_arithmetic":
                    delta = merge_utils.task_arithmetic(vectors, weights)
                elif config.method == "ties":
                    delta = merge_utils.ties(vectors, weights, config.density, config.majority_sign)
                elif config.method == "dare_linear":
                    delta = merge_utils.dare_linear(vectors, weights, config.density)
                else:
                    delta = merge_utils.dare_ties(vectors, weights, config.density, config.majority_sign)
                result = origin + delta
            merged[name] = result.to(originals[0].dtype).contiguous()
    return merged


def slerp(t: float, a: "torch.Tensor", b: "torch.Tensor", *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> "torch.Tensor":
    """Spherical linear interpolation between two tensors (PEFT's merge utilities have none).

    The angle is that of the flattened, normalized tensors; the unnormalized ones are interpolated
    along it, so `t=0` returns `a` exactly and `t=1` returns `b`. Nearly parallel (or zero) tensors
    fall back to linear interpolation, where the spherical formula divides by a vanishing sine.
    """
    import torch

    a64, b64 = a.double(), b.double()
    norm_a, norm_b = a64.norm(), b64.norm()
    if norm_a < eps or norm_b < eps:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    dot = float(torch.clamp((a64.flatten() / norm_a) @ (b64.flatten() / norm_b), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a64 + t * b64).to(a.dtype)
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (s0 * a64 + s1 * b64).to(a.dtype)


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor of a model directory is: its safetensors file, shape and dtype (read lazily)."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: str

    def load(self) -> "torch.Tensor":
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.name)


def tensor_index(directory: Path) -> dict[str, TensorSource]:
    """Every tensor of a model directory (all its safetensors files: sharded checkpoints too), from the headers."""
    from safetensors import safe_open

    index: dict[str, TensorSource] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                index[name] = TensorSource(path, name, tuple(part.get_shape()), part.get_dtype())
    return index


def _check_same_tensors(first: str, first_index: dict[str, TensorSource], other: str, index: dict[str, TensorSource]) -> None:
    missing, extra = sorted(set(first_index) - set(index)), sorted(set(index) - set(first_index))
    if missing or extra:
        name, holder, lacking = (missing[0], first, other) if missing else (extra[0], other, first)
        raise InvalidInputError(f"tensor {name} is in {holder} but not in {lacking}: merges need the same tensors in every model",
                                param="models")
    for name in sorted(first_index):
        if first_index[name].shape != index[name].shape:
            raise InvalidInputError(f"tensor {name} is {list(index[name].shape)} in {other}, {list(first_index[name].shape)} in "
                                    f"{first}: merges need the same shapes in every model", param="models")


def _tokenizer_vocab(directory: Path) -> dict[str, int] | bytes | None:
    """A tokenizer's token -> id map (`tokenizer.json`), else the bytes of its other files, else None."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)
    files = [directory / n for n in ("vocab.json", "merges.txt", "tokenizer.model") if (directory / n).is_file()]
    return b"".join(f.read_bytes() for f in files) or None


def _check_same_tokenizer(first: str, first_dir: Path, other: str, other_dir: Path) -> None:
    mine, theirs = _tokenizer_vocab(first_dir), _tokenizer_vocab(other_dir)
    if mine == theirs:
        return
    detail = ""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        token = next((t for t in sorted(set(mine) | set(theirs)) if mine.get(t) != theirs.get(t)), None)
        detail = f" (token {token!r} is id {theirs.get(token)} in {other}, {mine.get(token)} in {first})"
    raise InvalidInputError(f"{other} has another tokenizer than {first}{detail}: merged weights would mean different tokens; "
                            "merge models that share one tokenizer", param="models")


def _copy_files(source: Path, target: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)


def _context_length(config: dict[str, Any], seq_len: int) -> int:
    return int(config.get("max_position_embeddings") or config.get("n_positions") or seq_len)


@dataclass(frozen=True)
class EvalSet:
    """One held-out set the merge and its parents are measured on; `label` is its dataset or `fixed-sample`."""

    label: str
    data: "EvalData"


def _eval_sets(versions: list["ModelVersion"], registry: "ModelRegistry", tokenizer_dir: Path, model_config: dict[str, Any],
               tokens: int, seq_len: int) -> list[EvalSet]:
    """Each distinct held-out set of `versions` (`evaluate.held_out_data`: a version's dataset validation split, else the
    fixed stdlib sample), in order."""
    from lmaas.compress.evaluate import held_out_data

    sets: list[EvalSet] = []
    seen: set[str | None] = set()
    for version in versions:
        if version.dataset in seen:
            continue
        seen.add(version.dataset)
        data = held_out_data(version, registry, tokenizer_dir, tokens=tokens, seq_len=seq_len, batch_size=1,
                             max_seq_len=_context_length(model_config, seq_len))
        label = data.source.removesuffix(" validation") if data.source.endswith(" validation") else "fixed-sample"
        if all(s.data.source != data.source for s in sets):
            sets.append(EvalSet(label, data))
    return sets


def _loss_of(logits: "torch.Tensor", ids: "torch.Tensor") -> dict[str, float]:
    from lmaas.compress.evaluate import perplexity

    value = perplexity(logits, ids)
    return {"loss": math.log(value), "perplexity": value}


def _measure(merged_dir: Path, parents: dict[str, Path], sets: list[EvalSet],
             extra: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Held-out loss and perplexity of the merge and of every parent on every set (one model in memory at a time)."""
    from lmaas.compress.evaluate import logits_of
    from lmaas.models import load_model

    rows = [{"data": s.label, "source": s.data.source, "rows": int(s.data.ids.shape[0]), "seq_len": int(s.data.ids.shape[1]),
             "merged": {}, "parents": {}} for s in sets]
    for key, directory in [("merged", merged_dir), *parents.items()]:
        model = load_model(directory)
        for row, s in zip(rows, sets, strict=True):
            scores = _loss_of(logits_of(model, s.data.ids), s.data.ids)
            if key == "merged":
                row["merged"] = scores
            else:
                row["parents"][key] = scores
        del model
    for row in rows:
        for key, scores in (extra or {}).get(row["data"], {}).items():
            row["parents"][key] = scores
        best = min(p["loss"] for p in row["parents"].values())
        row["merged"]["loss_vs_best_parent"] = row["merged"]["loss"] - best
    return rows


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """A merge report flattened into registry metrics: `merged_loss/<data>`, `parent_loss/<ref>/<data>`, sizes, ..."""
    metrics = {k: float(report[k]) for k in ("size_bytes", "parent_size_bytes", "max_abs_logit_diff") if k in report}
    for row in report["eval"]:
        data = row["data"]
        metrics[f"merged_loss/{data}"] = row["merged"]["loss"]
        metrics[f"merged_perplexity/{data}"] = row["merged"]["perplexity"]
        metrics[f"loss_vs_best_parent/{data}"] = row["merged"]["loss_vs_best_parent"]
        for ref, scores in row["parents"].items():
            metrics[f"parent_loss/{ref}/{data}"] = scores["loss"]
    return metrics


def check_adapter_merge(adapter_ref: str, output_model: str | None, registry: "ModelRegistry", *,
                        tenant: str | None = None) -> tuple["ModelVersion", "ModelVersion", str]:
    """Resolve an adapter and its base and refuse what `merge_adapter` cannot merge, before any download.

    Returns:
        (adapter, base, output model name).

    Raises:
        NotFoundError: the adapter or its base does not resolve for `tenant` (another tenant's private one: the same message).
        AlreadyExistsError / PermissionDeniedError: the output model is another tenant's.
        InvalidInputError: not an adapter version, or a base that is not a full-precision causal LM.
    """
    registry = _acting(registry, tenant)
    adapter = registry.resolve(adapter_ref)
    if adapter.task != "adapter":
        raise InvalidInputError(f"{adapter.ref} is a {adapter.task} model, not a LoRA adapter; merge causal LMs' weights with "
                                "lmaas models merge", param="adapter")
    if not adapter.parent:
        raise InvalidInputError(f"{adapter.ref} records no base model (its parent); register it with --parent BASE", param="adapter")
    base = registry.resolve(adapter.parent)
    if base.task != "causal-lm":
        raise InvalidInputError(f"{adapter.ref}'s base {base.ref} is a {base.task} model; an adapter merges into a causal LM",
                                param="adapter")
    _check_not_quantized(base, json.loads(registry.read_file(base.ref, "config.json")[1]), "adapter")
    output = output_model or f"{adapter.name}-merged"
    if not NAME_RE.fullmatch(output):
        raise InvalidInputError(f"output model {output!r} must match {NAME_RE.pattern} (lowercase letters, digits, . _ -)",
                                param="output_model")
    registry.check_writable(output, create=True, param="output_model")
    return adapter, base, output


def merge_adapter(adapter_ref: str, output_model: str | None, registry: "ModelRegistry", *, tenant: str | None = None,
                  alias: str | None = None, eval_tokens: int = 8192, eval_seq_len: int = 128, tolerance: float = 1e-3,
                  progress: Progress | None = None, workdir: str | Path | None = None) -> MergeResult:
    """Merge a LoRA adapter into its base (PEFT's `merge_and_unload`) and register the standalone causal LM.

    The merged directory is checked against PEFT's base+adapter on the held-out rows: the largest
    |logit difference| is in the report (`max_abs_logit_diff`), and past `tolerance` nothing is registered.

    Args:
        adapter_ref: the adapter version (`task: adapter`; its registry parent is its base).
        output_model: registry name of the merge; None: `<adapter name>-merged`.
        registry: where the adapter is and the merge goes.
        tenant: the caller's tenant (None: an admin); it merges only adapters (and bases) it may see.
        alias: alias to point at the merged version.
        eval_tokens, eval_seq_len: held-out tokens per evaluation set and their row length.
        tolerance: largest |logit difference| between the merged model and base+adapter that is accepted.
        progress: called with a short line as each step starts.
        workdir: scratch directory (default: a temporary one, removed after).

    Returns:
        The registered version (`parents`: [base, adapter]; the adapter's dataset) and the report.

    Raises:
        NotFoundError, AlreadyExistsError, PermissionDeniedError, InvalidInputError: from `check_adapter_merge`.
        JobFailedError: the merged model's logits differ from base+adapter's by more than `tolerance`.
    """
    say = progress or (lambda _line: None)
    registry = _acting(registry, tenant)
    adapter, base, output = check_adapter_merge(adapter_ref, output_model, registry)
    scratch = Path(tempfile.mkdtemp(prefix="lmaas-merge-", dir=workdir))
    try:
        return _merge_adapter(adapter, base, output, registry, scratch, say, alias=alias, eval_tokens=eval_tokens,
                              eval_seq_len=eval_seq_len, tolerance=tolerance)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _merge_adapter(adapter: "ModelVersion", base: "ModelVersion", output: str, registry: "ModelRegistry", scratch: Path,
                   say: Progress, *, alias: str | None, eval_tokens: int, eval_seq_len: int, tolerance: float) -> MergeResult:
    import torch
    from peft import PeftModel

    from lmaas.compress.evaluate import logits_of, weights_bytes
    from lmaas.models import load_model, save_model
    from lmaas.models.family import read_config

    base_dir, adapter_dir, out = scratch / "base", scratch / "adapter", scratch / "merged"
    for version, directory in ((base, base_dir), (adapter, adapter_dir)):
        say(f"downloading {version.ref}")
        registry.download(version.ref, directory)
    out.mkdir()
    _copy_files(base_dir, out, TOKENIZER_FILES)
    _copy_files(adapter_dir, out, TOKENIZER_FILES)  # one the adapter was trained with (a chat template) wins
    sets = _eval_sets([adapter, base], registry, out, read_config(base_dir), eval_tokens, eval_seq_len)

    say(f"loading {base.ref} + {adapter.ref} (PEFT)")
    adapted = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir)).eval()
    adapted_logits = [logits_of(adapted, s.data.ids) for s in sets]
    started = time.time()
    say("merge_and_unload")
    with torch.no_grad():
        merged = adapted.merge_and_unload()
    save_model(merged, out)
    seconds = round(time.time() - started, 2)
    del adapted, merged

    say("checking the merged model against base + adapter")
    reloaded = load_model(out)  # the files that get registered, not the model in memory
    diff = max(float((logits_of(reloaded, s.data.ids) - expected).abs().max()) for s, expected in zip(sets, adapted_logits, strict=True))
    del reloaded
    if diff > tolerance:
        raise JobFailedError(f"the merge of {adapter.ref} into {base.ref} differs from base + adapter by {diff:.2e} in the logits "
                             f"(more than the tolerance {tolerance:g}); nothing was registered", param="tolerance")
    say("measuring the merge against its parents")
    with_adapter = {s.label: {adapter.ref: _loss_of(expected, s.data.ids)} for s, expected in zip(sets, adapted_logits, strict=True)}
    report = {
        "method": "merge_adapter",
        "parameters": {"tolerance": tolerance},
        "adapter": adapter.ref,
        "base": base.ref,
        "parents": [base.ref, adapter.ref],
        "max_abs_logit_diff": diff,
        "size_bytes": weights_bytes(out),
        "parent_size_bytes": weights_bytes(base_dir),
        "adapter_size_bytes": weights_bytes(adapter_dir),
        "seconds": seconds,
        "eval": _measure(out, {base.ref: base_dir}, sets, extra=with_adapter),
    }
    (out / MERGE_FILE).write_text(json.dumps(report, indent=1))
    say(f"registering {output}")
    version = registry.register_version(
        output, out, task="causal-lm", parents=[base.ref, adapter.ref], dataset=adapter.dataset,
        dataset_sha256=adapter.dataset_sha256, run="merge-adapter", metrics=report_metrics(report),
        description=f"{adapter.ref} merged into {base.ref} (max |logit diff| {diff:.1e})")
    if alias:
        registry.set_alias(version.name, alias, version.version)
    return MergeResult(version=version, report=report)
