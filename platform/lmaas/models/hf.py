"""Which Hugging Face causal-LM directories lmaas takes in, and the check every registration runs.

lmaas trains Llama-architecture models itself and imports any causal LM whose architecture
transformers ships and vLLM serves (`ARCHITECTURES`): Llama, Mistral, Qwen2, Qwen3, GPT-2. A
directory is refused, with a message that says what to change, when it:

- has no `config.json`, or one that is not a JSON object;
- asks to run its own code (`auto_map` in `config.json` or `tokenizer_config.json`: what
  `trust_remote_code=True` would execute; lmaas never runs a model's code);
- names an architecture outside `ARCHITECTURES`, or a `model_type` other than that architecture's
  (lmaas's own quantized formats, `models.quantized`, name one of their own so that plain
  transformers refuses them);
- has no tokenizer (`tokenizer.json`, `vocab.json` + `merges.txt`, or `tokenizer.model`);
- has no safetensors weights, or weights that miss a parameter of the architecture or hold it
  in another shape (a config that does not describe the weights beside it).

The check reads only `config.json`, `tokenizer_config.json` and the safetensors headers (never the
tensors), through two callables, so the registry runs it on a local directory before uploading
and on stored files before committing a multi-part upload.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any

from lmaas.errors import InvalidInputError

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
}
"""Causal-LM architectures lmaas registers, trains on and serves (with vLLM or its own engine): name -> `model_type`."""

TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
"""File sets of which a causal LM directory needs one: a fast tokenizer, a GPT-2 BPE, or a SentencePiece model."""

WEIGHTS_INDEX = "model.safetensors.index.json"


def check_causal_lm(
    paths: Collection[str],
    read: Callable[[str], bytes],
    read_header: Callable[[str], dict[str, Any]],
) -> dict[str, Any]:
    """Check a causal-LM directory given its file paths and two readers; returns its `config.json`.

    Args:
        paths: the directory's files, relative paths with `/`.
        read: the bytes of one of `paths` (small JSON files only).
        read_header: the JSON header of one of `paths`'s `.safetensors` files.

    Raises:
        InvalidInputError: what is wrong (see the module docstring), with `param="files"`.
    """
    files = set(paths)
    config = _json_object(read, "config.json", files, required=True)
    for name, found in (("config.json", config), ("tokenizer_config.json", _json_object(read, "tokenizer_config.json", files, required=False))):
        if found and found.get("auto_map"):
            raise InvalidInputError(
                f"{name} asks to run the model's own code (auto_map: {', '.join(sorted(found['auto_map']))}); lmaas never runs "
                f"a model's code (trust_remote_code). Use an architecture transformers ships: {supported()}",
                param="files",
            )
    architectures = config.get("architectures") or []
    known = [a for a in architectures if a in ARCHITECTURES]
    if not known:
        named = ", ".join(map(str, architectures)) or "none"
        raise InvalidInputError(f"config.json: architecture {named} is not one lmaas serves; use one of {supported()}", param="files")
    from lmaas.models.quantized import is_quantized

    model_type = config.get("model_type")
    if model_type != ARCHITECTURES[known[0]] and not is_quantized(config):  # (lmaas's formats name a model_type of their own)
        raise InvalidInputError(
            f"config.json: model_type {model_type!r} does not match architecture {known[0]} (expected {ARCHITECTURES[known[0]]!r})",
            param="files",
        )
    if not any(all(f in files for f in needed) for needed in TOKENIZER_SETS):
        raise InvalidInputError(
            "no tokenizer: a causal LM needs tokenizer.json (or vocab.json + merges.txt, or tokenizer.model) beside its weights",
            param="files",
        )
    shapes = _stored_shapes(files, read, read_header)
    if not config.get("quantization_config"):  # a quantized format stores other tensors; its loader checks them
        _check_weights(config, shapes)
    return config


def supported() -> str:
    return ", ".join(ARCHITECTURES)


def context_length(config: dict[str, Any], default: int = 2048) -> int:
    """The longest sequence a `config.json` dict's positions cover (GPT-2 says n_positions)."""
    return int(config.get("max_position_embeddings") or config.get("n_positions") or default)


def attention_shape(config: dict[str, Any]) -> tuple[int, int, int, int]:
    """(layers, attention heads, key/value heads, head size) of a `config.json` dict, in any of `ARCHITECTURES`' spellings (GPT-2 says n_layer, n_head, n_embd)."""
    layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 1)
    heads = int(config.get("num_attention_heads") or config.get("n_head") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config.get("hidden_size") or config.get("n_embd") or 0)
    return layers, heads, kv_heads, int(config.get("head_dim") or hidden // heads)


def _json_object(read: Callable[[str], bytes], name: str, files: set[str], *, required: bool) -> dict[str, Any] | None:
    if name not in files:
        if required:
            raise InvalidInputError(f"no {name}: a causal LM directory needs the Hugging Face {name} of its architecture", param="files")
        return None
    try:
        value = json.loads(read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"{name} is not valid JSON: {e}", param="files") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{name} must hold a JSON object", param="files")
    return value


def _stored_shapes(files: set[str], read: Callable[[str], bytes], read_header: Callable[[str], dict[str, Any]]) -> dict[str, list[int]]:
    """Every stored tensor's shape, from the safetensors headers (the index's shards, else every `.safetensors` file)."""
    if WEIGHTS_INDEX in files:
        index = _json_object(read, WEIGHTS_INDEX, files, required=True) or {}
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if s not in files]
        if not shards or missing:
            raise InvalidInputError(f"{WEIGHTS_INDEX} names shards that are not there: {', '.join(missing) or 'none listed'}", param="files")
    else:
        shards = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if not shards:
        raise InvalidInputError("no weights: a causal LM needs model.safetensors (or a sharded model.safetensors.index.json)", param="files")
    shapes: dict[str, list[int]] = {}
    for shard in shards:
        for tensor, info in read_header(shard).items():
            if tensor != "__metadata__" and isinstance(info, dict):
                shapes[tensor] = list(info.get("shape") or [])
    return shapes


def _check_weights(config: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """Refuse weights that miss a parameter of the architecture `config` describes or hold one in another shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a bad config
        raise InvalidInputError(f"config.json does not describe a {config['model_type']} model transformers can build: {e}", param="files") from None
    prefix = f"{model.base_model_prefix}."
    for name, parameter in model.named_parameters():  # tied weights appear once, under their first name
        stored = shapes.get(name)
        if stored is None and name.startswith(prefix):
            stored = shapes.get(name.removeprefix(prefix))  # checkpoints saved from the base model
        if stored is None:
            raise InvalidInputError(f"the weights have no tensor {name}, which a {config['model_type']} model of this config needs", param="files")
        if stored != list(parameter.shape):
            raise InvalidInputError(
                f"the weights' tensor {name} has shape {stored}; this config.json needs {list(parameter.shape)}", param="files"
            )
