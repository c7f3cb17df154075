"""Compression on a tiny model trained here: every method gives a loadable, generating, reported child version.

The parent is trained for a few hundred steps on stdlib source tokens (a plain torch loop) and
registered with a dataset version published beside it, so perplexity, agreement and the
recovery fine-tune all run on real held-out data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import SEQ, make_causal_lm, publish_dataset, stdlib_lines  # noqa: E402



def train_tiny(model_dir: Path, ids: list[int], steps: int = 300) -> None:
    """A few hundred AdamW steps on random windows of `ids`; saves over `model_dir`."""
    import torch

    from lmaas.models import load_model, save_model

    torch.manual_seed(0)
    torch.set_num_threads(1)  # on a busy 2-core machine one thread is 10x faster than two contending
    model = load_model(model_dir).train()
    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ, (16,))
        batch = torch.stack([data[s : s + SEQ] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (1 - step / steps) + 1e-4
        optimizer.step()
    save_model(model.eval(), model_dir)  # the tokenizer files stay beside it


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):
    """A registry (local files + SQLite) holding `tiny-lm:1`, trained, with its dataset `stdlib-test:1`."""
    from tokenizers import Tokenizer

    from lmaas import db
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    root = tmp_path_factory.mktemp("compress")
    model_dir = make_causal_lm(root, size="tiny", vocab_size=512, max_seq_len=128)
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("\n".join(stdlib_lines(5000))).ids
    train_tiny(model_dir, ids)
    registry = ModelRegistry(Storage(f"file://{root / 'store'}"), db.connect(f"sqlite:///{root / 'lmaas.db'}"))
    dataset = publish_dataset(registry.storage, registry.engine, root / "dataset", ids, model_dir)
    registry.register_version("tiny-lm", model_dir, task="causal-lm", dataset=dataset)
    return registry


def config(**fields):
    from lmaas.compress import CompressConfig

    return CompressConfig(**{"ref": "tiny-lm:1", "threads": 1, "eval_tokens": 2048, "decode_tokens": 8, "timing_repeats": 1, "batch_size": 4, **fields})


def check_variant(registry, result, tmp_path: Path, method: str) -> dict:
    """The child loads through `lmaas.models.load_model`, generates, and carries its report and record."""
    import torch

    from lmaas.models import load_model

    version = result.version
    assert version.parent == "tiny-lm:1" and version.dataset == "stdlib-test:1"
    assert registry.lineage("tiny-lm:1").to_dict()["children"].count(version.ref) == 1
    out = tmp_path / version.ref.replace(":", "-")
    registry.download(version.ref, out)
    record = json.loads((out / "compression.json").read_text())
    assert record["method"] == method and record["parent"] == "tiny-lm:1"
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "stdlib-test:1 validation"
    for key in ("perplexity", "agreement", "size_bytes", "parameters", "sparsity", "latency_ms_per_token", "batch_tokens_per_s"):
        assert key in version.metrics, key
    model = load_model(out)
    prompt = torch.tensor([[5, 6, 7, 8]])
    generated = model.generate(input_ids=prompt, max_length=9, min_length=9, do_sample=False)
    assert generated.shape == (1, 9)
    return report


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_quantization_gives_a_smaller_close_variant(registry, tmp_path: Path, method: str):
    from lmaas.compress import compress

    lines = []
    result = compress(config(method=method, alias="candidate", gate={"max_perplexity_increase": 0.5}), registry, progress=lines.append)
    report = check_variant(registry, result, tmp_path, method)
    assert lines[0] == "downloading tiny-lm:1"
    assert result.passed and result.version.status == "ready"
    assert registry.resolve(f"tiny-lm-{method}@candidate").ref == result.version.ref
    assert report["ratios"]["size_ratio"] < (0.4 if method != "int4-weight" else 0.3)
    assert report["parent"]["perplexity"] < 60, "the fixture model did not learn"
    assert report["ratios"]["perplexity_increase"] < (0.05 if method != "int4-weight" else 0.3)
    assert report["variant"]["agreement"] > (0.9 if method != "int4-weight" else 0.7)


def test_unstructured_pruning_with_recovery(registry, tmp_path: Path):
    from lmaas.compress import compress

    result = compress(config(method="prune", sparsity=0.5, recovery_steps=40), registry)
    report = check_variant(registry, result, tmp_path, "prune")
    assert report["variant"]["pruned_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["variant"]["sparsity"] > 0.3  # over every parameter: embeddings and norms stay dense
    # Held-out perplexity on the same fixed validation rows, before and after the 40 recovery steps.
    # Measured over 2 fixture seeds x 3 recovery seeds: after/before 0.944-0.964 (spread 0.02); the
    # first and last single training batches of the same runs differed by -0.33 to +0.08 nats, noise
    # larger than what 40 steps at lr 1e-4 change (seed 0 went 3.13 -> 3.17: the old assertion).
    before, after = report["variant"]["perplexity_before_recovery"], report["variant"]["perplexity"]
    assert after < before * 0.98, (before, after)


def test_semi_structured_pruning_is_archived_by_a_strict_gate(registry, tmp_path: Path):
    from lmaas.compress import compress

    result = compress(config(method="prune", pattern="2:4", alias="production",
                             gate={"max_perplexity_increase": 0.0001, "min_agreement": 0.999}), registry)
    check_variant(registry, result, tmp_path, "prune")
    assert not result.passed and result.version.status == "archived"
    assert "perplexity" in result.reasons[0] and "gate failed" in result.version.description
    assert result.version.metrics["gate_passed"] == 0.0
    assert registry.aliases(result.version.name) == []


def test_export_onnx_matches_pytorch(registry, tmp_path: Path):
    import numpy as np
    import onnxruntime as ort
    import torch

    from lmaas.compress import compress
    from lmaas.models import load_model

    result = compress(config(method="export", formats=["onnx", "torchscript"], torchscript_dir=str(tmp_path / "ts")), registry)
    check_variant(registry, result, tmp_path, "export")
    assert result.report["variant"]["onnx_max_abs_diff"] < 1e-3
    assert result.report["variant"]["torchscript_max_abs_diff"] < 1e-3
    assert not any(f.path.endswith(".pt") for f in result.version.files)
    out = tmp_path / "onnx"
    registry.download(result.version.ref, out)
    ids = torch.randint(0, 500, (3, 17))
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        want = load_model(out)(input_ids=ids).logits.numpy()
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ref": "nope:3"}, "nope"),
        ({"method": "int4-weight", "group_size": 48}, "group_size 48"),
        ({"method": "prune", "ref": "tiny-lm-int8-weight"}, "already quantized"),
    ],
)
def test_bad_requests_fail_before_work(registry, fields, message):
    from lmaas.compress import check_request
    from lmaas.errors import LmaasError

    with pytest.raises(LmaasError, match=message):
        check_request(config(**fields), registry)


def test_an_embedding_model_is_refused(registry, tmp_path: Path):
    from serve_helpers import EMBEDDING_DIR

    from lmaas.compress import check_request
    from lmaas.errors import InvalidInputError

    registry.register_version("minilm", EMBEDDING_DIR, task="embedding")
    with pytest.raises(InvalidInputError, match="embedding model; int8-dynamic compresses causal-lm"):
        check_request(config(ref="minilm"), registry)


# -- distill: a Ray Train job on the session cluster (each fit costs ~20 s of fixed start-up here)

def distill_config(**fields):
    from lmaas.compress import DistillConfig

    return DistillConfig(**{
        "teacher": "tiny-lm:1", "student": "tiny", "student_overrides": {"num_hidden_layers": 1, "intermediate_size": 128},
        "num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 8, "max_steps": 20, "warmup_steps": 2, "lr": 1e-2,
        "log_interval": 5, "eval_interval": 10, "checkpoint_interval": 10, "eval_threads": 1, "eval_tokens": 2048,
        "decode_tokens": 8, "timing_repeats": 1, "decode_batch_size": 4, **fields})


def test_distill_survives_a_killed_worker_and_registers_a_student_that_generates(ray_cluster, registry, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from lmaas.compress import compress
    from lmaas.train.run import FAULT_ENV, read_run

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:17:{marker}")  # rank 1 dies (SIGKILL) at step 17, once (after the step-10 checkpoint is in)
    lines: list[str] = []
    result = compress(distill_config(alias="candidate", gate={"max_perplexity_increase": 5.0}), registry, progress=lines.append)
    assert marker.read_text().startswith("killed rank 1 at step 17")

    report = check_variant(registry, result, tmp_path, "distill")
    version = result.version
    assert version.name == "tiny-lm-distilled" and result.passed
    assert registry.resolve("tiny-lm-distilled@candidate").ref == version.ref
    assert report["parameters"]["temperature"] == 2.0 and report["parameters"]["student_overrides"]["num_hidden_layers"] == 1
    variant = report["variant"]
    assert variant["parameters"] < report["parent"]["parameters"] and variant["parameter_ratio"] < 0.6
    assert variant["train_steps"] == 20 and variant["train_restarts"] == 1  # the restarted group resumed from the step-10 checkpoint
    # it learned something in 20 steps: measured lm loss 4.93 (random weights: ln 512 = 6.24), perplexity 103
    assert variant["train_lm_loss"] < 6.0 and variant["perplexity"] < 300
    run = read_run(registry.storage, version.run)
    assert run["status"] == "finished" and run["teacher"] == {"ref": "tiny-lm:1", "temperature": 2.0, "alpha": 0.5}
    assert any(line.startswith("step 20/20 loss") for line in lines), lines

    out = tmp_path / "student"
    registry.download(version.ref, out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == report_vocab(registry)
    generated = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 9)


def report_vocab(registry) -> int:
    _, raw = registry.read_file("tiny-lm:1", "config.json")
    return json.loads(raw)["vocab_size"]


def test_distill_bad_input_fails_before_any_work(registry, tmp_path):
    from serve_helpers import EMBEDDING_DIR

    from lmaas.compress import check_request
    from lmaas.errors import InvalidInputError, NotFoundError
    from lmaas.models import load_model
    from lmaas.models.quantized import save_quantized

    registry.register_version("minilm-teacher", EMBEDDING_DIR, task="embedding")
    registry.download("tiny-lm:1", tmp_path / "fp32")
    save_quantized(load_model(tmp_path / "fp32"), tmp_path / "q8", "int8-weight", tokenizer_dir=tmp_path / "fp32")
    registry.register_version("tiny-q8", tmp_path / "q8", task="causal-lm", dataset="stdlib-test:1")
    other = make_causal_lm(tmp_path / "other", vocab_size=300)
    registry.register_version("other-vocab", other, task="causal-lm", dataset="stdlib-test:1")
    registry.register_version("no-dataset", tmp_path / "fp32", task="causal-lm")
    before = registry.storage.list("runs")
    cases = [
        ({"student": "small"}, InvalidInputError, "not fewer than teacher tiny-lm:1's"),
        ({"student_overrides": {}}, InvalidInputError, "not fewer than"),  # the same shape as the teacher
        ({"teacher": "minilm-teacher"}, InvalidInputError, "embedding model; distill needs a causal-lm teacher"),
        ({"teacher": "tiny-q8"}, InvalidInputError, "tiny-q8:1 is quantized"),
        ({"teacher": "other-vocab"}, InvalidInputError, "has vocab_size 300"),
        ({"teacher": "no-dataset"}, InvalidInputError, "records no training dataset; set dataset="),
        ({"teacher": "nope"}, NotFoundError, "nope"),
        ({"dataset": "nope:1"}, NotFoundError, "nope"),
    ]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            check_request(distill_config(**fields), registry)
    assert registry.storage.list("runs") == before  # nothing started
