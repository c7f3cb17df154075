"""Named sizes of one Llama-style architecture, and HF-format save/load."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmaas.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelSize:
    """One named size. Parameter counts in `description` assume the vocab size noted there."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    tie_embeddings: bool
    description: str


SIZES: dict[str, ModelSize] = {
    # tests and the demo: ~0.2M parameters at vocab 1024, trains in seconds on a CPU core; 32-dimensional
    # heads, the smallest vLLM's CPU attention kernels take, so the default engine serves it
    "tiny": ModelSize(64, 2, 2, 1, 256, True, "~0.2M params (vocab 1k); tests, CPU"),
    # a laptop CPU or one small GPU: ~5M parameters at vocab 8k
    "small": ModelSize(256, 4, 8, 4, 704, True, "~5M params (vocab 8k); CPU or one GPU"),
    # GPT-2-small class: ~135M parameters at vocab 32k (untied embeddings)
    "base": ModelSize(768, 12, 12, 12, 2048, False, "~135M params (vocab 32k); GPUs, DDP"),
    # TinyLlama-1.1B shape (grouped-query attention): ~1.1B parameters at vocab 32k
    "1b": ModelSize(2048, 22, 32, 4, 5632, False, "~1.1B params (vocab 32k); GPUs, FSDP"),
}


def model_config(
    size: str,
    *,
    vocab_size: int,
    max_seq_len: int,
    eos_id: int,
    bos_id: int | None = None,
    **overrides: Any,
) -> "LlamaConfig":
    """The `LlamaConfig` of a named size for a tokenizer and context length.

    Args:
        size: one of `SIZES`.
        vocab_size: the tokenizer's vocabulary size.
        max_seq_len: longest sequence the model is trained and served with.
        eos_id: end-of-sequence token id (also used as BOS and padding when `bos_id` is None).
        overrides: any other `LlamaConfig` field (e.g. `num_hidden_layers=1`).

    Raises:
        InvalidInputError: unknown size or a non-positive dimension.
    """
    if size not in SIZES:
        raise InvalidInputError(f"model size {size!r} is unknown; use one of {', '.join(SIZES)}", param="model")
    for field, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
        if value < 1:
            raise InvalidInputError(f"{field} must be positive, got {value}", param=field)
    from transformers import LlamaConfig

    s = SIZES[size]
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "intermediate_size": s.intermediate_size,
        "tie_word_embeddings": s.tie_embeddings,
        "max_position_embeddings": max_seq_len,
        "bos_token_id": eos_id if bos_id is None else bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model(config: "PretrainedConfig", *, seed: int | None = 0) -> "PreTrainedModel":
    """A freshly initialized causal LM of `config`'s architecture (the lmaas family's Llama, or an
    imported one: `lmaas.models.hf.ARCHITECTURES`); the same seed gives the same weights in every process."""
    import torch
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def config_from_dict(fields: dict[str, Any]) -> "PretrainedConfig":
    """The transformers config class of `fields["model_type"]` (a `config.json` as a dict)."""
    from transformers import AutoConfig

    fields = dict(fields)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def decoder_layers(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The transformer blocks of a causal LM (also inside a PEFT wrapper): the modules of the classes
    transformers keeps whole when it splits a model (`_no_split_modules`), FSDP's unit of sharding."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(hf_model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def parameter_count(model: "torch.nn.Module") -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(config: "LlamaConfig", seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the PaLM appendix B estimate used for MFU.

    6 N for the matmuls over N non-embedding parameters plus 12 L H T for attention scores.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = h // config.num_attention_heads
    # a gated MLP (Llama, Mistral, Qwen) has three matrices; GPT-2's has two of 4h (n_inner None)
    mlp = 3 * h * config.intermediate_size if getattr(config, "intermediate_size", None) else 2 * h * (getattr(config, "n_inner", None) or 4 * h)
    per_layer = h * h * 2 + 2 * h * kv * head_dim + mlp
    lm_head = h * config.vocab_size
    return 6.0 * (layers * per_layer + lm_head) + 12.0 * layers * h * seq_len


def save_model(
    model: "LlamaForCausalLM",
    directory: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    state_dict: dict[str, "torch.Tensor"] | None = None,
    generation: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory that `AutoModelForCausalLM.from_pretrained` loads unchanged.

    Args:
        model: the model (only its config is used when `state_dict` is given).
        directory: created if missing.
        tokenizer_dir: HF tokenizer files to copy beside the weights.
        state_dict: full weights gathered elsewhere (e.g. from FSDP shards) instead of `model`'s.
        generation: overrides for `generation_config.json` (defaults: sampling off, EOS from config).
    """
    from transformers import GenerationConfig

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    if state_dict is None:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        # written directly: a sharded (FSDP) model's own save_pretrained would touch its DTensors
        from safetensors.torch import save_file

        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        config.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        **(generation or {}),
    ).save_pretrained(directory)
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, directory)
    return directory


def copy_tokenizer(source: str | Path, directory: str | Path) -> None:
    """Copy the HF tokenizer files of `source` into `directory`.

    Raises:
        NotFoundError: `source` has no `tokenizer.json`.
    """
    source, directory = Path(source), Path(directory)
    if not (source / "tokenizer.json").is_file():
        raise NotFoundError(f"tokenizer {source}: no tokenizer.json there", param="tokenizer")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def load_model(directory: str | Path, *, dtype: "torch.dtype | None" = None, device: str = "cpu") -> "LlamaForCausalLM":
    """Load a saved model directory (safetensors only; pickle weights are refused).

    Quantized directories (`quantization_config.quant_method == "lmaas"`, see
    `lmaas.models.quantized`) load with their int8/int4 modules swapped in.

    Raises:
        NotFoundError: no `config.json` or no safetensors weights in `directory`.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise NotFoundError(f"model {directory}: no config.json there", param="model")
    if not any(directory.glob("*.safetensors")):
        raise NotFoundError(f"model {directory}: no .safetensors weights there", param="model")
    from lmaas.models.quantized import is_quantized, load_quantized

    if is_quantized(read_config(directory)):
        import torch

        if dtype not in (None, torch.float32):
            raise InvalidInputError(f"model {directory} is quantized; it loads only with dtype float32", param="dtype")
        return load_quantized(directory, device=device)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def read_config(directory: str | Path) -> dict[str, Any]:
    """`config.json` of a model directory as a dict."""
    return json.loads((Path(directory) / "config.json").read_text())
