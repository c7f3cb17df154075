"""LoRA adapters: what an adapter version holds, and the check every registration runs.

An adapter version (`task: adapter`) is the directory PEFT writes with `save_pretrained`:

    adapter_config.json        PEFT's LoraConfig (`peft_type: LORA`, `r`, `lora_alpha`, `target_modules`, ...)
    adapter_model.safetensors  the low-rank factors, keys `base_model.model.<module>.lora_A.weight` / `lora_B.weight`
    tokenizer files            optional (the base's; a chat template the adapter was trained with)

Its base model is its registry `parent` (a `causal-lm` version); `adapter_config.json`'s
`base_model_name_or_path` records the same reference for PEFT's own tools. The check reads only
`adapter_config.json` and the safetensors headers (the adapter's and the base's), never the
tensors, through callables like `models.hf.check_causal_lm`'s, so the registry runs it on a local
directory before uploading and on stored files before committing an upload.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from typing import Any

from lmaas.errors import InvalidInputError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TASK = "adapter"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def check_adapter(
    paths: Collection[str],
    read: Callable[[str], bytes],
    read_header: Callable[[str], dict[str, Any]],
    base_header: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check a LoRA adapter directory; returns its `adapter_config.json`.

    Args:
        paths: the directory's files, relative paths with `/`.
        read: the bytes of one of `paths` (small JSON files only).
        read_header: the JSON header of one of `paths`'s `.safetensors` files.
        base_header: the base model's safetensors header (tensor name -> {"shape": ...}); when
            given, every factor must fit the base weight it adapts.

    Raises:
        InvalidInputError: with `param="files"`: no or a bad `adapter_config.json`, not a LoRA
            adapter, no safetensors weights, a key that is not a LoRA factor, a factor of another
            rank, or one that does not fit its base weight.
    """
    files = set(paths)
    if CONFIG_FILE not in files:
        raise InvalidInputError(f"an adapter needs {CONFIG_FILE} (PEFT's save_pretrained writes it)", param="files")
    try:
        config = json.loads(read(CONFIG_FILE))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError(f"{CONFIG_FILE} is not valid JSON", param="files") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{CONFIG_FILE} must hold a JSON object", param="files")
    if config.get("peft_type") != "LORA":
        raise InvalidInputError(f"{CONFIG_FILE} has peft_type {config.get('peft_type')!r}; lmaas serves and merges LORA adapters",
                                param="files")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidInputError(f"{CONFIG_FILE}: r (the rank) must be a positive integer, got {rank!r}", param="files")
    if WEIGHTS_FILE not in files:
        raise InvalidInputError(f"an adapter needs {WEIGHTS_FILE} (safetensors; adapter_model.bin is pickle and refused)", param="files")
    header = {k: v for k, v in read_header(WEIGHTS_FILE).items() if k != "__metadata__"}
    if not header:
        raise InvalidInputError(f"{WEIGHTS_FILE} holds no tensors", param="files")
    for key, entry in sorted(header.items()):
        match = _KEY.match(key)
        if match is None:
            raise InvalidInputError(f"{WEIGHTS_FILE}: {key!r} is not a LoRA factor (base_model.model.<module>.lora_A|lora_B.weight)",
                                    param="files")
        shape = list(entry.get("shape", []))
        side = match["side"]
        if len(shape) != 2 or shape[0 if side == "A" else 1] != rank and not _rank_pattern(config, match["module"], shape, side):
            raise InvalidInputError(f"{WEIGHTS_FILE}: {key} has shape {shape}, not rank r={rank}", param="files")
        if base_header is not None:
            _check_fits(key, match["module"], side, shape, base_header, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    return config


def _rank_pattern(config: dict[str, Any], module: str, shape: list[int], side: str) -> bool:
    """Whether PEFT's per-module `rank_pattern` gives `module` the rank in `shape`."""
    rank = shape[0 if side == "A" else 1] if len(shape) == 2 else None
    return any(module.endswith(pattern) and value == rank for pattern, value in (config.get("rank_pattern") or {}).items())


def _check_fits(key: str, module: str, side: str, shape: list[int], base_header: dict[str, Any], *, fan_in_fan_out: bool) -> None:
    base = base_header.get(f"{module}.weight")
    if base is None:
        raise InvalidInputError(f"{WEIGHTS_FILE}: {key} adapts {module}, which the base model does not have", param="files")
    base_shape = list(base.get("shape", []))
    if len(base_shape) != 2:
        raise InvalidInputError(f"{WEIGHTS_FILE}: {key} adapts {module}, a {len(base_shape)}-d weight in the base", param="files")
    # A is [r, in], B is [out, r]; an nn.Linear weight is [out, in], GPT-2's Conv1D's [in, out] (PEFT's fan_in_fan_out)
    out_features, in_features = base_shape[::-1] if fan_in_fan_out else base_shape
    fits = shape[1] == in_features if side == "A" else shape[0] == out_features
    if not fits:
        raise InvalidInputError(f"{WEIGHTS_FILE}: {key} has shape {shape}, which does not fit {module}'s {base_shape} in the base model",
                                param="files")
