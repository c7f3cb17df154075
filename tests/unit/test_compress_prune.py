"""Magnitude pruning: exact unstructured sparsity, the 2:4 pattern, masks that survive recovery."""

from __future__ import annotations

import pytest
import torch

from lmaas.compress.prune import magnitude_mask, prune_model, recover, semi_structured_mask, sparsity_of


def test_unstructured_sparsity_is_exact_and_drops_the_smallest():
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(1))
    for sparsity in (0.1, 0.5, 0.9):
        mask = magnitude_mask(w, sparsity)
        assert int((~mask).sum()) == round(sparsity * w.numel())
        assert w[~mask].abs().max() <= w[mask].abs().min()


def test_ties_do_not_break_the_count():
    mask = magnitude_mask(torch.ones(10, 10), 0.3)
    assert int((~mask).sum()) == 30


def test_two_of_every_four_kept_and_they_are_the_largest():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    mask = semi_structured_mask(w)
    groups = mask.reshape(16, 8, 4)
    assert (groups.sum(dim=2) == 2).all()
    kept_min = torch.where(groups, w.abs().reshape(16, 8, 4), torch.inf).amin(dim=2)
    dropped_max = torch.where(~groups, w.abs().reshape(16, 8, 4), -torch.inf).amax(dim=2)
    assert (kept_min >= dropped_max).all()


def test_two_four_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        semi_structured_mask(torch.randn(4, 6))


def tiny_model():
    from lmaas.models import build_model, model_config

    return build_model(model_config("tiny", vocab_size=64, max_seq_len=16, eos_id=0, num_hidden_layers=1))


@pytest.mark.parametrize(("pattern", "sparsity"), [("unstructured", 0.7), ("2:4", 0.5)])
def test_prune_model_and_recovery_keep_the_masks(pattern: str, sparsity: float):
    model = tiny_model()
    masks = prune_model(model, sparsity, pattern)
    assert sparsity_of(model) == pytest.approx(sparsity, abs=1e-4)
    assert "lm_head" not in masks  # tied to the embedding: stays dense
    batches = iter(lambda: torch.randint(0, 64, (2, 16)), None)
    losses = recover(model, masks, batches, steps=3, lr=1e-2)
    assert len(losses) == 3
    assert sparsity_of(model) == pytest.approx(sparsity, abs=1e-4)


def test_recovery_lr_is_where_the_parents_schedule_ended(tmp_path):
    import json

    from lmaas.compress.prune import DEFAULT_RECOVERY_LR, recovery_lr_of

    assert recovery_lr_of(tmp_path) == DEFAULT_RECOVERY_LR  # no training record
    record = {"run": "r1", "dataset": "d:1", "config": {"dataset": "d:1", "lr": 2e-3, "min_lr_ratio": 0.2}}
    (tmp_path / "lmaas_training.json").write_text(json.dumps(record))
    assert recovery_lr_of(tmp_path) == pytest.approx(4e-4)
    record["config"]["min_lr_ratio"] = 0.0  # a schedule that decays to 0: a tenth of the peak
    (tmp_path / "lmaas_training.json").write_text(json.dumps(record))
    assert recovery_lr_of(tmp_path) == pytest.approx(2e-4)
    (tmp_path / "lmaas_training.json").write_text("{not json")
    assert recovery_lr_of(tmp_path) == DEFAULT_RECOVERY_LR
