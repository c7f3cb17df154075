"""LoRA on Ray Train: wrap the frozen base in PEFT, and name the adapter's tensors as PEFT saves them.

A `method: lora` run trains only the low-rank factors (`lora_A`, `lora_B`) PEFT adds beside the
chosen linear layers; the base stays frozen in its own dtype. Under DDP only the factors' gradients
are all-reduced; under FSDP2 each decoder layer (base weights and factors) is one shard unit, as for
full training. Checkpoints hold only the factors (`adapter_model.safetensors`, the file PEFT's
`save_pretrained` writes, so the last one registers unchanged) and their AdamW moments; a restart
loads the base from the registry again and the factors from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmaas.models.adapter import WEIGHTS_FILE
from lmaas.train.config import LoraSettings


def wrap(base: Any, settings: LoraSettings, *, base_ref: str) -> Any:  # noqa: ANN401 - a PeftModel
    """`base` with LoRA factors beside its target modules; only the factors require gradients.

    Args:
        base: the pretrained causal LM (weights already loaded).
        settings: rank, alpha, dropout, target modules.
        base_ref: the registry reference of the base, recorded as `base_model_name_or_path`.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=(settings.target_modules[0] if settings.target_modules == ["all-linear"] else settings.target_modules),
        task_type="CAUSAL_LM",
        # GPT-2 keeps its projections in Conv1D ([in, out]), which PEFT adapts transposed
        fan_in_fan_out=getattr(base.config, "model_type", "") == "gpt2",
    )
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = base_ref  # get_peft_model sets the base's own (a temp dir or None)
    return model


def peft_key(fqn: str) -> str:
    """The key PEFT's `save_pretrained` gives a factor: its module path without the adapter's name
    (`...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`)."""
    return fqn.replace(".default.", ".")


def write_adapter(peft_model: Any, directory: Path, weights: dict[str, Any]) -> None:  # noqa: ANN401
    """`adapter_config.json` and `adapter_model.safetensors` from the factors' full state dict
    (`weights`, keyed by the wrapped model's parameter names), as PEFT's `save_pretrained` would write them."""
    from safetensors.torch import save_file

    peft_model.peft_config["default"].save_pretrained(str(directory))  # adapter_config.json
    # only the factors: a full state dict keeps a tied head (lm_head = embed_tokens) even without frozen parameters
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    save_file({peft_key(k): v.detach().contiguous() for k, v in weights.items() if k in trainable}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt"})


def read_adapter(peft_model: Any, directory: Path) -> dict[str, Any]:  # noqa: ANN401
    """The factors of a checkpoint keyed by `peft_model`'s parameter names (the inverse of `write_adapter`).

    Raises:
        KeyError: the checkpoint holds factors of modules the model does not adapt (another rank or targets).
    """
    from safetensors.torch import load_file

    names = {peft_key(name): name for name, p in peft_model.named_parameters() if p.requires_grad}
    saved = load_file(str(directory / WEIGHTS_FILE))
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise KeyError(f"the checkpoint's adapter holds {unknown[0]}, which this run's LoRA settings do not create")
    return {names[k]: v for k, v in saved.items()}


def trainable_parameters(model: Any) -> int:  # noqa: ANN401
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
