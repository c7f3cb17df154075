"""Quantized model directories: int8/int4 weights + scales in `model.safetensors`, loaded as small modules.

Three schemes, named as `lmaas.compress` methods:

| scheme         | linear weights                        | compute on CPU                                  |
|----------------|---------------------------------------|-------------------------------------------------|
| `int8-dynamic` | int8, one scale per output channel    | int8 x int8 GEMM, activations quantized per call |
| `int8-weight`  | int8, one scale per output channel    | int8 -> fp32 per call, output scaled (weight-only) |
| `int4-weight`  | 4-bit, two per uint8, a scale per group | unpacked to fp32 per call (weight-only)         |

The token embedding (and the LM head, tied to it or not) is int8 with one scale per row.
Layout in `model.safetensors`: `<module>.weight` is the int8 (or packed uint8) tensor and
`<module>.weight_scale` its fp32 scales; every other tensor is unchanged. `config.json` carries

    "model_type": "lmaas-quantized",
    "quantization_config": {"quant_method": "lmaas", "scheme": "int4-weight", "group_size": 32,
                            "modules": ["model.layers.0.self_attn.q_proj", ...], "embeddings": true,
                            "base_model_type": "llama"}

Which runtimes load it: `lmaas.models.load_model` (hence lmaas serving) only. The files are plain
safetensors that any reader opens, and dequantizing is `q * scale` (int4: low nibble first,
stored as q + 8, scales per `group_size` inputs). transformers' `from_pretrained` and vLLM refuse
the directory (unknown `model_type`) on purpose: transformers 5.23 ignores an unknown
`quant_method` and would load the int8 values as fp32 weights. For another runtime use the
parent's fp32 version, a pruned version (plain HF weights, any runtime), or an `export` (ONNX:
onnxruntime and anything that reads ONNX opset 18).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmaas.errors import InvalidInputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUANT_METHOD = "lmaas"
QUANTIZED_MODEL_TYPE = "lmaas-quantized"
SCHEMES = ("int8-dynamic", "int8-weight", "int4-weight")
SCALE_SUFFIX = "_scale"


# -- tensor methods --------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (output channel): `weight ~ q * scale[:, None]`."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit in groups of `group_size` inputs; two values per uint8 (low nibble first).

    Returns:
        (packed uint8 [out, in // 2], fp32 scales [out, in // group_size]).

    Raises:
        InvalidInputError: the input width is not a multiple of `group_size` (or `group_size` is odd).
    """
    out_features, in_features = weight.shape
    if group_size < 2 or group_size % 2 or in_features % group_size:
        raise InvalidInputError(
            f"group_size {group_size} must be even and divide the input width {in_features}", param="group_size"
        )
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    scale = (w.abs().amax(dim=2) / 7.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, :, None]).clamp(-8, 7).to(torch.int16) + 8  # 0..15
    q = q.reshape(out_features, in_features).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_features, half = packed.shape
    q = torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(out_features, half * 2).float() - 8.0
    group_size = q.shape[1] // scale.shape[1]
    return (q.reshape(out_features, scale.shape[1], group_size) * scale[:, :, None]).reshape(out_features, -1)


# -- modules ---------------------------------------------------------------------------------
class Int8DynamicLinear(nn.Module):
    """nn.Linear with int8 weights; activations are quantized per call (int8 x int8 GEMM)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self._packed = None
        try:
            import warnings

            with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao
                warnings.simplefilter("ignore")
                wq = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(wq, self.bias)
        except (RuntimeError, AttributeError):  # no quantized engine in this build: weight-only fallback
            self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.dtype == torch.float32:
            shape = x.shape
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self._packed, True)
            return y.reshape(*shape[:-1], self.out_features)
        return nn.functional.linear(x, dequantize_int8(self.weight, self.weight_scale).to(x.dtype), self.bias)


class Int8WeightLinear(nn.Module):
    """nn.Linear with int8 weights and fp32 activations (weight-only)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-output-channel scales commute with the matmul: scale the output, not the weight.
        # (`aten._weight_int8pack_mm` measured 8-18x slower than this on the 2-core dev machine.)
        y = nn.functional.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4WeightLinear(nn.Module):
    """nn.Linear with group-wise 4-bit weights, unpacked per call (memory-light, not fast)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.shape[1] * 2, packed.shape[0]
        self.register_buffer("weight", packed)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, dequantize_int4(self.weight, self.weight_scale).to(x.dtype), self.bias)


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows and one scale per row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.weight_scale[ids].unsqueeze(-1)


LINEAR_OF_SCHEME = {"int8-dynamic": Int8DynamicLinear, "int8-weight": Int8WeightLinear, "int4-weight": Int4WeightLinear}


# -- whole models ----------------------------------------------------------------------------
def quantize_state_dict(
    model: "PreTrainedModel", scheme: str, *, group_size: int = 32, embeddings: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The quantized tensors of `model` and the `quantization_config` that describes them.

    Every `nn.Linear` except the LM head gets `scheme`; the token embedding (and an untied LM
    head) get int8 per row when `embeddings` is true.

    Raises:
        InvalidInputError: unknown scheme, or a linear width `group_size` does not divide.
    """
    if scheme not in SCHEMES:
        raise InvalidInputError(f"quantization scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}", param="method")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)  # saved once, as the embedding
    head = model.get_output_embeddings()
    modules = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            if scheme == "int4-weight":
                q, scale = quantize_int4(module.weight, group_size)
            else:
                q, scale = quantize_int8(module.weight)
            state[f"{name}.weight"], state[f"{name}.weight{SCALE_SUFFIX}"] = q, scale
            modules.append(name)
    if embeddings:
        embed_name = _module_name(model, model.get_input_embeddings())
        q, scale = quantize_int8(model.get_input_embeddings().weight)
        state[f"{embed_name}.weight"], state[f"{embed_name}.weight{SCALE_SUFFIX}"] = q, scale
        if not tied and head is not None:
            q, scale = quantize_int8(head.weight)
            state["lm_head.weight"], state[f"lm_head.weight{SCALE_SUFFIX}"] = q, scale
    config = {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size if scheme == "int4-weight" else None,
              "modules": modules, "embeddings": embeddings}
    return state, config


def save_quantized(model: "PreTrainedModel", directory: str | Path, scheme: str, *, group_size: int = 32,
                   embeddings: bool = True, tokenizer_dir: str | Path | None = None) -> Path:
    """Write a quantized model directory that `lmaas.models.load_model` loads."""
    from lmaas.models.family import save_model

    state, qconfig = quantize_state_dict(model, scheme, group_size=group_size, embeddings=embeddings)
    directory = save_model(model, directory, tokenizer_dir=tokenizer_dir, state_dict=state)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    # transformers 5.23 ignores an unknown quant_method and would load the int8 values as fp32 weights;
    # an unknown model_type makes it (and vLLM) refuse the directory instead of serving garbage
    qconfig["base_model_type"] = config["model_type"]
    config_file.write_text(json.dumps({**config, "model_type": QUANTIZED_MODEL_TYPE, "quantization_config": qconfig}, indent=2))
    return directory


def is_quantized(config: dict[str, Any]) -> bool:
    """Whether a `config.json` dict describes an lmaas-quantized model."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def load_quantized(directory: str | Path, *, device: str = "cpu") -> "PreTrainedModel":
    """Build the model of a quantized directory and swap in the quantized modules (CPU inference)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    fields = json.loads((directory / "config.json").read_text())
    qconfig = fields.pop("quantization_config")
    fields.pop("model_type")
    config = AutoConfig.for_model(qconfig["base_model_type"], **fields)
    scheme = qconfig["scheme"]
    if scheme not in SCHEMES:
        raise InvalidInputError(f"model {directory}: quantization scheme {scheme!r} is unknown to this lmaas", param="model")
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_file(str(directory / "model.safetensors"))
    linear = LINEAR_OF_SCHEME[scheme]
    for name in qconfig["modules"]:
        bias = tensors.pop(f"{name}.bias", None)
        _set_submodule(model, name, linear(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight{SCALE_SUFFIX}"), bias))
    if qconfig.get("embeddings"):
        embed = model.get_input_embeddings()
        embed_name = _module_name(model, embed)
        q, scale = tensors.pop(f"{embed_name}.weight"), tensors.pop(f"{embed_name}.weight{SCALE_SUFFIX}")
        _set_submodule(model, embed_name, Int8Embedding(q, scale, embed.padding_idx))
        if config.tie_word_embeddings:
            head_q, head_scale = q, scale
        else:
            head_q, head_scale = tensors.pop("lm_head.weight"), tensors.pop(f"lm_head.weight{SCALE_SUFFIX}")
        head_linear = Int8DynamicLinear if scheme == "int8-dynamic" else Int8WeightLinear
        _set_submodule(model, "lm_head", head_linear(head_q, head_scale, None))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    expected_missing = {k for k in missing if k.endswith((".weight", SCALE_SUFFIX, ".bias")) and _is_quantized_key(k, model)}
    if unexpected or set(missing) - expected_missing:
        raise InvalidInputError(
            f"model {directory}: weights do not match its config (missing {sorted(set(missing) - expected_missing)[:3]}, "
            f"unexpected {unexpected[:3]})", param="model")
    return model.to(device).eval()


def _is_quantized_key(key: str, model: nn.Module) -> bool:
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(module, (Int8DynamicLinear, Int8WeightLinear, Int4WeightLinear, Int8Embedding)) or key == "lm_head.weight"


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
