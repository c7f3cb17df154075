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
