"""`CompressConfig` refuses bad input on construction; every shipped compress YAML validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmaas.compress import CompressConfig
from lmaas.config import load_config
from lmaas.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("compress_*.yaml"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method=int3", "method"),
        ("sparsity=1.0", "strictly between 0 and 1"),
        ("sparsity=0", "strictly between 0 and 1"),
        ("method=distill", "use DistillConfig"),
        ("bogus=1", "bogus"),
        ("output_name=Bad Name", "output_name"),
    ],
)
def test_bad_input_is_one_clear_error(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(CompressConfig, None, ["method=prune", override])


def test_two_four_is_half():
    with pytest.raises(ConfigError, match="2:4"):
        load_config(CompressConfig, None, ["method=prune", "pattern=2:4", "sparsity=0.7"])


def test_parameters_recorded_per_method():
    assert CompressConfig(method="int4-weight", group_size=64).parameters() == {"group_size": 64, "quantize_embeddings": True}
    assert set(CompressConfig(method="prune").parameters()) >= {"sparsity", "pattern", "recovery_steps"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    text = path.read_text()
    assert text.startswith("#") and "jobs/compress.py" in text.split("\n\n")[0], "the header says how to run it"
    load_config(CompressConfig, path)


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"compress_int8.yaml", "compress_int4.yaml", "compress_prune.yaml", "compress_export.yaml"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("temperature=0", "temperature must be above 0"),
        ("temperature=-1", "temperature must be above 0"),
        ("alpha=1.5", "alpha must be between 0 and 1"),
        ("alpha=-0.1", "alpha must be between 0 and 1"),
        ("student=huge", "student: Value error, unknown model size 'huge'"),
        ("model=tiny", "model: Extra inputs are not permitted"),  # the student's size is `student`
        ("student_overrides.vocab_size=99", "student_overrides cannot set vocab_size"),
        ("student_overrides.hidden_size=63", "hidden_size 63 must be a multiple of num_attention_heads 2"),
        ("student_overrides.num_hidden_layers=0", "must be positive"),
    ],
)
def test_distill_bad_input_is_one_clear_error(override: str, message: str):
    from lmaas.compress import DistillConfig

    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, None, [override])


def test_distill_config_defaults_and_its_training_run():
    from lmaas.compress import DistillConfig

    config = load_config(DistillConfig, None, ["teacher=big-lm@production", "student_overrides.num_hidden_layers=1", "alias=staging"])
    assert config.output_model == "big-lm-distilled" and config.model == "tiny"
    run = config.train_config("corpus:2")
    assert type(run).__name__ == "TrainConfig" and run.dataset == "corpus:2" and run.model == "tiny"
    assert run.alias is None  # distillation sets the alias itself, only if the student passes its gate
    assert config.parameters()["student_overrides"] == {"num_hidden_layers": 1}


def test_distillation_loss_is_kl_times_t_squared_plus_lm_loss():
    import torch

    from lmaas.train.loop import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    lm = torch.tensor(3.0)
    assert distillation_loss(student, teacher, lm, temperature=2.0, alpha=0.0).item() == pytest.approx(3.0)
    assert distillation_loss(teacher, teacher, lm, temperature=2.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = torch.softmax(teacher / t, -1)
    kl = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean()  # mean over the 10 positions
    got = distillation_loss(student, teacher, lm, temperature=t, alpha=0.3)
    assert got.item() == pytest.approx((0.3 * kl * t * t + 0.7 * 3.0).item(), rel=1e-5)
