"""Training pieces without Ray: config validation, the LR schedule, pickle-free checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from lmaas.config import load_config
from lmaas.data import tokenizer
from lmaas.errors import ConfigError
from lmaas.models import build_model, model_config
from lmaas.train import checkpoint
from lmaas.train.config import TrainConfig
from lmaas.train.loop import lr_factor


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=huge", "model: Value error, unknown model size 'huge'; use one of tiny, small, base, 1b"),
        ("lr=0", "lr: Value error, learning rate must be above 0"),
        ("lr=-1e-3", "learning rate must be above 0"),
        ("modle=tiny", "modle"),
        ("strategy=zero3", "strategy"),
        ("num_workers=0", "num_workers"),
        ("warmup_steps=100", "warmup_steps (100) must be below max_steps (60)"),
        ("method=lora", "method lora adapts a pretrained model: set init_from"),
        ("lora.rank=0", "lora.rank"),
        ("lora.quantize_base=nf4", "needs use_gpu"),
        ("method=dora", "method"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [override])
    assert message in info.value.message and "\n" not in info.value.message


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].glob("jobs/configs/train_*.yaml"))
    assert {p.name for p in configs} >= {"train_tiny_cpu.yaml", "train_small_gpu_ddp.yaml", "train_1b_fsdp.yaml", "train_lora.yaml"}
    for path in configs:
        load_config(TrainConfig, path)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(110)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.55)  # halfway through the decay
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def _training_setup(seed: int):
    model = build_model(model_config("tiny", vocab_size=270, max_seq_len=16, eos_id=0), seed=seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))


def test_checkpoint_round_trip_restores_model_optimizer_and_schedule_without_pickle(tmp_path):
    model, optimizer, scheduler = _training_setup(seed=0)
    ids = torch.randint(0, 270, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    tok_dir = tokenizer.train_bpe(["def f(x): return x"] * 20, 270).save(tmp_path / "tok")
    state = checkpoint.TrainerState(step=3, tokens=96, history=[{"step": 3, "loss": 5.0}])
    out = checkpoint.save(tmp_path / "ckpt", model=model, base_model=model, optimizer=optimizer, scheduler=scheduler,
                          state=state, tokenizer_dir=tok_dir, rank=0)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".pt", ".bin", ".pkl")) for n in names)
    json.loads((out / "trainer_state.json").read_text())

    fresh, fresh_opt, fresh_sched = _training_setup(seed=1)
    restored = checkpoint.restore(out, model=fresh, base_model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert restored == state
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for a, b in zip(optimizer.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_sched.last_epoch == 3 and fresh_opt.param_groups[1]["weight_decay"] == 0.0
    # one more identical step keeps both in lockstep
    for m, o in ((model, optimizer), (fresh, fresh_opt)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    # what registration copies: every file but the training state
    assert names & set(checkpoint.MODEL_FILES) == names - {"optimizer.safetensors", "trainer_state.json"}
    assert checkpoint.parse_state((out / "trainer_state.json").read_text()) == state


def test_custom_worker_resources_are_checked_before_any_worker_starts():
    from lmaas.errors import InvalidInputError
    from lmaas.train.run import check_resources

    config = TrainConfig(num_workers=2, cpus_per_worker=0.5, resources_per_worker={"trainer": 1})
    check_resources(config, {"CPU": 4, "trainer": 2})
    with pytest.raises(InvalidInputError, match=r"trainer=1 x 2 workers needs 2; the cluster has 1 \(start nodes with"):
        check_resources(config, {"CPU": 4, "trainer": 1})
