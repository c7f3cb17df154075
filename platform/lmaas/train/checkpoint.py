"""Training checkpoints that are also model directories, with no pickle anywhere.

A checkpoint directory is a complete HF model (`config.json`, `model.safetensors`,
`generation_config.json`, tokenizer files: it loads with `from_pretrained` and can be registered
as is) plus the training state:

    optimizer.safetensors   AdamW moments, flattened by parameter name
    trainer_state.json      step, tokens seen, data epoch, scheduler, optimizer hyper-parameters,
                            the metric history (so a loss curve survives restarts)

Full (unsharded) state dicts are used for DDP and FSDP alike: rank 0 gathers and writes them,
and on resume every rank reads them and keeps its part, so a run can resume on a different
worker count.

A LoRA run's checkpoint is an adapter directory instead (`adapter_config.json`,
`adapter_model.safetensors`: see `lmaas.train.lora`) with the same training state; the frozen
base is neither gathered nor written.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmaas.models import save_model
from lmaas.models import adapter
from lmaas.models.family import TOKENIZER_FILES, WEIGHTS_FILE, copy_tokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MODEL_FILES = ("config.json", WEIGHTS_FILE, "generation_config.json", adapter.CONFIG_FILE, adapter.WEIGHTS_FILE, *TOKENIZER_FILES)
"""What a checkpoint holds of a model (a full model's files, or an adapter's), besides the training state."""


@dataclass
class TrainerState:
    """Where a run is: restored from a checkpoint on resume."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0


def _options(*, adapter_only: bool = False):  # noqa: ANN202 - StateDictOptions
    """Full state dicts on CPU; of the trainable parameters only for an adapter (the frozen base stays out)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only, strict=not adapter_only)


def is_adapter(base_model: Any) -> bool:  # noqa: ANN401
    """Whether `base_model` is a PEFT-wrapped model whose checkpoint is its adapter."""
    return hasattr(base_model, "peft_config")


def save(
    directory: str | Path | None,
    *,
    model: Any,
    base_model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainerState,
    tokenizer_dir: str | Path,
    rank: int,
) -> Path | None:
    """Gather the full state (a collective: every rank calls it) and write it on rank 0.

    Args:
        directory: where rank 0 writes (None: a new temporary directory, made on rank 0 only; Ray
            Train's ASYNC upload deletes it once persisted).
        model: the wrapped model (DDP, FSDP or compiled) whose state is gathered.
        base_model: the plain causal LM (its config names the artifact), or the PEFT model of a
            LoRA run (the checkpoint is then its adapter).

    Returns:
        The directory on rank 0, None elsewhere.
    """
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    lora = is_adapter(base_model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(adapter_only=lora))
    if rank != 0:
        return None
    directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="lmaas-ckpt-"))
    weights = {k: v.detach().contiguous() for k, v in model_sd.items()}
    if lora:
        from lmaas.train.lora import write_adapter

        write_adapter(base_model, directory, weights)
        copy_tokenizer(tokenizer_dir, directory)
    else:
        if base_model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        save_model(base_model, directory, tokenizer_dir=tokenizer_dir, state_dict=weights)
    # {"state": {param name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}: tensors to
    # safetensors as "name/key", everything else (hyper-parameters, group membership) to JSON
    tensors, scalars = {}, {}
    for name, slots in optim_sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER_FILE), metadata={"format": "pt"})
    record = {
        "trainer": asdict(state),
        "scheduler": scheduler.state_dict(),
        "optimizer": {"param_groups": optim_sd["param_groups"], "scalars": scalars},
    }
    (directory / STATE_FILE).write_text(json.dumps(record, indent=1))
    return directory


def restore(directory: str | Path, *, model: Any, base_model: Any, optimizer: Any, scheduler: Any) -> TrainerState:
    """Load a checkpoint into the model, optimizer and scheduler of this rank (a collective for FSDP).

    Every rank reads the full state and keeps its own part (its shards, under FSDP).
    """
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    directory = Path(directory)
    record = json.loads((directory / STATE_FILE).read_text())
    lora = is_adapter(base_model)
    if lora:
        from lmaas.train.lora import read_adapter

        model_sd = read_adapter(base_model, directory)
    else:
        model_sd = load_file(str(directory / WEIGHTS_FILE))
        if base_model.config.tie_word_embeddings and "lm_head.weight" not in model_sd:
            model_sd["lm_head.weight"] = model_sd["model.embed_tokens.weight"]
    slots: dict[str, dict[str, Any]] = {}
    for flat, value in [*load_file(str(directory / OPTIMIZER_FILE)).items(), *record["optimizer"]["scalars"].items()]:
        name, _, key = flat.rpartition("/")
        slots.setdefault(name, {})[key] = value
    optim_sd = {"state": slots, "param_groups": record["optimizer"]["param_groups"]}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_options(adapter_only=lora))
    scheduler.load_state_dict(record["scheduler"])
    return TrainerState(**record["trainer"])


def parse_state(text: str) -> TrainerState:
    """The trainer state held in a checkpoint's `trainer_state.json` text."""
    return TrainerState(**json.loads(text)["trainer"])
