"""Quantize-dequantize error bounds and packing of the int8 and int4 tensor methods."""

from __future__ import annotations

import pytest
import torch

from lmaas.errors import InvalidInputError
from lmaas.models.quantized import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def weight(rows: int = 48, cols: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen)
    w[3] *= 100  # one loud row must not coarsen the others' scales
    return w


def test_int8_per_channel_error_is_within_half_a_step():
    w = weight()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0],)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert err[0].max() < w[0].abs().max() / 200  # row 0 keeps its own fine scale


def test_int4_groupwise_error_is_within_half_a_step_and_packs_two_per_byte():
    w = weight()
    packed, scale = quantize_int4(w, group_size=16)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 32) and scale.shape == (48, 4)
    back = dequantize_int4(packed, scale)
    step = scale.repeat_interleave(16, dim=1)
    assert ((back - w).abs() <= step / 2 + 1e-5).all()


def test_int4_round_trips_exact_grid_values():
    scale = torch.tensor([[0.5, 2.0]])
    q = torch.tensor([[-7, -3, 0, 7, 1, 2, -7, 5]], dtype=torch.float)  # |max| 7 in each group: scale is exact
    w = q * scale.repeat_interleave(4, dim=1)
    packed, got_scale = quantize_int4(w, group_size=4)
    assert torch.equal(dequantize_int4(packed, got_scale), w)


def test_zero_rows_do_not_divide_by_zero():
    q, scale = quantize_int8(torch.zeros(2, 8))
    assert torch.equal(dequantize_int8(q, scale), torch.zeros(2, 8))


def test_int4_group_size_must_divide_the_width():
    with pytest.raises(InvalidInputError, match="group_size 24"):
        quantize_int4(weight(), group_size=24)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_quantized_directory_loads_through_load_model(tmp_path, scheme: str):
    from safetensors import safe_open

    from lmaas.models import build_model, load_model, model_config
    from lmaas.models.quantized import Int8Embedding, save_quantized

    model = build_model(model_config("tiny", vocab_size=96, max_seq_len=32, eos_id=0, num_hidden_layers=1, tie_word_embeddings=False)).eval()
    directory = save_quantized(model, tmp_path / scheme, scheme, group_size=16)
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q_proj.dtype == (torch.uint8 if scheme == "int4-weight" else torch.int8)
        assert f.get_tensor("lm_head.weight").dtype == torch.int8
    loaded = load_model(directory)
    assert isinstance(loaded.get_input_embeddings(), Int8Embedding)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert (got - want).abs().max() < (0.15 if scheme == "int4-weight" else 0.05) * want.abs().max()


def test_transformers_refuses_the_quantized_format_instead_of_misloading_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmaas.models import build_model, model_config
    from lmaas.models.quantized import save_quantized

    model = build_model(model_config("tiny", vocab_size=64, max_seq_len=16, eos_id=0, num_hidden_layers=1))
    directory = save_quantized(model, tmp_path / "q", "int8-weight")
    with pytest.raises(ValueError, match="lmaas-quantized"):
        AutoModelForCausalLM.from_pretrained(directory)
