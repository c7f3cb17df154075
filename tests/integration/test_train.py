"""Training on the session Ray cluster: DDP and FSDP on CPU, a killed worker, resume, S3 checkpoints.

Each `fit()` costs ~20 s of fixed start-up here, so every test trains few, short runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmaas import db
from lmaas.data.config import IngestConfig
from lmaas.data.ingest import ingest
from lmaas.errors import InvalidInputError, NotFoundError
from lmaas.registry import ModelRegistry
from lmaas.storage import Storage
from lmaas.train.config import TrainConfig
from lmaas.train.run import FAULT_ENV, read_run, train

FAST = {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 8, "log_interval": 5, "warmup_steps": 5, "lr": 3e-3}


@pytest.fixture(scope="module")
def home(tmp_path_factory, ray_cluster):
    """One store, database and ingested dataset (the built-in corpus) for the module."""
    root = tmp_path_factory.mktemp("train")
    store = Storage(f"file://{root / 'store'}")
    engine = db.connect(f"sqlite:///{root / 'lmaas.db'}")
    config = IngestConfig(name="corpus", sources=["stdlib:60"], vocab_size=1024, block_size=128, validation_percent=10.0)
    version = ingest(config, storage=store, engine=engine).version
    assert version.validation_rows >= 16
    return store, engine, version


def run(home, progress=None, resume=None, storage=None, **overrides):
    store, engine, version = home
    config = TrainConfig(dataset=version.ref, **{**FAST, **overrides})
    return train(config, storage=storage or store, engine=engine, progress=progress, resume=resume)


def generate(registry: ModelRegistry, ref: str, tmp_path: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry.download(ref, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok("import os\ndef ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 12 or out[0, -1].item() == tok.eos_token_id
    return tok.decode(out[0, ids.shape[1]:])


@pytest.fixture(scope="module")
def trained(home):
    """`trained(strategy)`: (result, live reports) of a 40-step run registered as `lm-{strategy}@staging`, run once per module."""
    runs: dict[str, tuple] = {}

    def get(strategy: str) -> tuple:
        if strategy not in runs:
            reports: list[dict] = []
            result = run(home, progress=reports.append, strategy=strategy, max_steps=40, eval_interval=10,
                         checkpoint_interval=20, output_model=f"lm-{strategy}", alias="staging")
            runs[strategy] = (result, reports)
        return runs[strategy]

    return get


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_workers_train_register_and_the_model_loads_with_transformers(home, trained, strategy, tmp_path):
    store, engine, version = home
    result, reports = trained(strategy)

    val = [h["val_loss"] for h in result.history if "val_loss" in h]
    # it learns: the validation loss on fixed held-out rows, measured 6.40 -> 6.03 here, the same to 1e-7
    # for DDP and FSDP (seeded weights and data order, so no run-to-run noise to cross)
    assert len(val) >= 2 and val[-1] < val[0] - 0.3, val
    assert [r["step"] for r in reports] == [5, 10, 15, 20, 25, 30, 35, 40]  # live progress from rank 0
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in reports)
    assert reports[-1]["tokens"] == 40 * 2 * 8 * 128

    registry = ModelRegistry(store, engine)
    mv = registry.resolve(f"lm-{strategy}@staging")
    assert (mv.version, mv.task, mv.run, mv.dataset) == (1, "causal-lm", result.run_id, version.ref)
    assert mv.dataset_sha256 == version.content_hash
    assert mv.metrics["val_loss"] == pytest.approx(val[-1]) and mv.metrics["parameters"] == result.parameters
    assert {f.path for f in mv.files} >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "loss.png"}
    assert not {"optimizer.safetensors", "trainer_state.json"} & {f.path for f in mv.files}
    assert isinstance(generate(registry, f"lm-{strategy}:1", tmp_path), str)

    record = read_run(store, result.run_id)
    assert record["status"] == "finished" and record["model"] == f"lm-{strategy}:1"
    assert record["config"]["strategy"] == strategy
    assert store.read_bytes(f"runs/{result.run_id}/loss.png").startswith(b"\x89PNG")
    assert registry.read_file(f"lm-{strategy}:1", "loss.png")[1] == store.read_bytes(f"runs/{result.run_id}/loss.png")  # the version carries the curve
    checkpoints = {p.split("/")[2] for p in store.list(f"runs/{result.run_id}") if p.split("/")[2].startswith("checkpoint_2")}
    assert len(checkpoints) == 2  # keep_checkpoints=2: the ones at steps 20 and 40


def test_a_killed_worker_resumes_from_the_last_checkpoint(home, tmp_path, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:17:{marker}")  # rank 1 dies (SIGKILL) at step 17, once
    result = run(home, max_steps=30, checkpoint_interval=10, eval_interval=10, output_model=None)
    assert marker.read_text().startswith("killed rank 1 at step 17")
    steps = [h["step"] for h in result.history]
    # steps 11-17 were lost; the restarted group continued at 11 from the step-10 checkpoint
    assert steps == [5, 10, 15, 20, 25, 30], steps
    assert result.metrics["restarts"] == 1
    assert result.history[1]["restarts"] == 0 and result.history[-1]["restarts"] == 1
    assert result.model_version is None


def test_resume_by_hand_continues_the_step_counter_on_s3(home, s3_server, tmp_path):
    store, engine, version = home
    remote = Storage(s3_server.uri("train-runs"), endpoint_url=s3_server.endpoint)
    # the dataset's shards live in the local store: copy that version to S3 so both runs read S3
    store.download_dir(version.prefix, tmp_path / "ds")
    remote.publish_dir(tmp_path / "ds", version.prefix)

    first = run(home, storage=remote, max_steps=20, checkpoint_interval=10, eval_interval=10, output_model=None)
    assert first.checkpoint_uri.startswith("s3://") and [h["step"] for h in first.history] == [5, 10, 15, 20]
    second = run(home, storage=remote, resume=first.run_id, max_steps=30, checkpoint_interval=10,
                 eval_interval=10, output_model="lm-s3")
    assert second.run_id == first.run_id
    assert [h["step"] for h in second.history] == [5, 10, 15, 20, 25, 30]  # the history went on from step 20
    assert second.history[-1]["tokens"] == 30 * 2 * 8 * 128
    mv = ModelRegistry(remote, engine).resolve("lm-s3")
    assert remote.exists(f"{mv.prefix}/model.safetensors")


def test_bad_input_is_rejected_before_any_worker_starts(home):
    store, engine, version = home
    before = store.list("runs")
    with pytest.raises(NotFoundError, match="dataset nope not found"):
        train(TrainConfig(dataset="nope"), storage=store, engine=engine)
    with pytest.raises(InvalidInputError, match="needs 32 CPUs; the cluster has 2"):
        train(TrainConfig(dataset=version.ref, num_workers=64), storage=store, engine=engine)
    with pytest.raises(InvalidInputError, match="leaves 0 of 2 CPUs for the Ray Data tasks"):
        train(TrainConfig(dataset=version.ref, num_workers=2, cpus_per_worker=1), storage=store, engine=engine)
    with pytest.raises(InvalidInputError, match="needs 1 GPUs; the cluster has 0"):
        train(TrainConfig(dataset=version.ref, num_workers=1, use_gpu=True), storage=store, engine=engine)
    with pytest.raises(NotFoundError, match="run 'no-such-run' not found"):
        train(TrainConfig(dataset=version.ref), storage=store, engine=engine, resume="no-such-run")
    assert store.list("runs") == before  # nothing was started or written


def test_sweep_runs_every_grid_point_and_registers_the_best(home):
    from lmaas.train.sweep import SweepConfig, sweep

    store, engine, version = home
    config = TrainConfig(dataset=version.ref, **{**FAST, "max_steps": 10, "eval_interval": 10, "checkpoint_interval": 10, "cpus_per_worker": 0.125,
                                                 "output_model": "lm-swept", "alias": "best"})
    search = SweepConfig(parameters={"lr": [1e-4, 1e-2]}, max_concurrent=2)  # both trials at once
    result = sweep(config, search, storage_uri=store.uri, endpoint_url=None, database_url=str(engine.url))
    assert sorted(t["config"]["lr"] for t in result.trials) == [1e-4, 1e-2]
    best = min(result.trials, key=lambda t: t["val_loss"])
    assert result.best["run_id"] == best["run_id"] and best["config"]["lr"] == 1e-2  # 1e-4 barely moves in 10 steps
    mv = ModelRegistry(store, engine).resolve("lm-swept@best")
    assert mv.run == best["run_id"] and mv.metrics["val_loss"] == pytest.approx(best["val_loss"])
    assert read_run(store, best["run_id"])["model"] == "lm-swept:1"


def test_sweep_configs_are_checked_before_any_trial(home):
    from lmaas.train.sweep import SweepConfig, sweep

    store, engine, version = home
    crowded = TrainConfig(dataset=version.ref, **FAST)  # 2 x 0.5 CPUs of 2
    with pytest.raises(InvalidInputError, match="leave 1 of 2 CPUs for the data feed; a sweep needs 1.5"):
        sweep(crowded, SweepConfig(parameters={"lr": [1e-3]}), storage_uri=store.uri, endpoint_url=None,
              database_url=str(engine.url))

    with pytest.raises(ValueError, match="'dataset' is not a searchable TrainConfig field"):
        SweepConfig(parameters={"dataset": ["a", "b"]})
    with pytest.raises(ValueError, match="grid search needs lists of values"):
        SweepConfig(parameters={"lr": {"loguniform": [1e-4, 1e-2]}})


@pytest.fixture(scope="module")
def chat(home, trained, tmp_path_factory):
    """A chat dataset tokenized with lm-ddp:1's tokenizer (`lm-ddp:1` exported to `base`), and its validation
    rows as (input ids, labels) tensors; made once for the full and the LoRA fine-tunes."""
    import json

    import pyarrow.parquet as pq
    import torch

    from lmaas.data.feed import shard_paths

    store, engine, _ = home
    trained("ddp")
    tmp_path = tmp_path_factory.mktemp("chat")
    base = tmp_path / "base"
    ModelRegistry(store, engine).download("lm-ddp:1", base)
    lines = [{"messages": [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": f"add two numbers, take {i}"},
                           {"role": "assistant", "content": CHAT_ANSWER}]} for i in range(120)]
    lines += [{"prompt": f"# sum of {i} and 1\n", "completion": f"{i} + 1"} for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    version = ingest(IngestConfig(name="chat", sources=[str(path)], format="chat", tokenizer=str(base), block_size=128, validation_percent=10),
                     storage=store, engine=engine).version
    table = pq.read_table(shard_paths(version, store, "validation")[0], filesystem=store.pyarrow_filesystem()[0])
    ids, labels = (torch.tensor(table.column(c).to_pylist()) for c in ("input_ids", "labels"))
    return {"version": version, "base": base, "lines": lines, "ids": ids, "labels": labels}


CHAT_ANSWER = "def add(a, b):\n    return a + b"


def answer_loss(model, chat) -> float:
    """Mean loss of `model` over the chat validation rows' answer tokens (what transformers computes with their labels)."""
    import torch

    ids, labels = chat["ids"], chat["labels"]
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=ids[i : i + 8], labels=labels[i : i + 8]).loss.item() * len(ids[i : i + 8])
                   for i in range(0, len(ids), 8)) / len(ids)


def test_fine_tune_on_chat_examples_trains_and_evaluates_on_the_assistant_turns_only(home, chat, tmp_path):
    """format chat: OpenAI chat lines rendered with the base's chat template, one example a row, labels on the answers."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmaas.data.chat import IGNORE
    from lmaas.data.versions import list_versions

    store, engine, _ = home
    registry = ModelRegistry(store, engine)
    base, lines, version = chat["base"], chat["lines"], chat["version"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(lines[0]), json.dumps(lines[1]), json.dumps({"messages": [{"role": "user", "content": "hi"}]})]))
    with pytest.raises(InvalidInputError, match=r"bad.jsonl:3: messages needs at least one assistant message"):
        ingest(IngestConfig(name="chat-bad", sources=[str(bad)], format="chat", tokenizer=str(base), block_size=64), storage=store, engine=engine)
    assert list_versions(engine, "chat-bad") == []  # nothing published

    assert version.train_rows + version.validation_rows == len(lines) and version.validation_rows > 0  # one example a row
    tokenizer = AutoTokenizer.from_pretrained(base)
    trained_text = {tokenizer.decode(row[mask]) for row, mask in zip(chat["ids"], chat["labels"] != IGNORE)}
    assert f"{CHAT_ANSWER}<|im_end|>\n" in trained_text
    assert all(t == f"{CHAT_ANSWER}<|im_end|>\n" or t.endswith(" + 1<|endoftext|>") for t in trained_text)
    assert all("add two numbers" not in t for t in trained_text)  # the user's words are context, not targets

    tuned = train(TrainConfig(dataset=version.ref, init_from="lm-ddp:1", output_model="ft-chat", max_steps=10, eval_interval=10,
                              checkpoint_interval=10, **FAST), storage=store, engine=engine)
    registry.download("ft-chat:1", tmp_path / "tuned")
    # the validation loss is the loss over the answers only: what transformers computes with these labels
    tuned_loss = answer_loss(AutoModelForCausalLM.from_pretrained(tmp_path / "tuned"), chat)
    assert tuned.metrics["val_loss"] == pytest.approx(tuned_loss, rel=0.05), tuned.metrics
    before = answer_loss(AutoModelForCausalLM.from_pretrained(base), chat)
    assert tuned.metrics["val_loss"] < before - 1.0, (before, tuned.metrics)  # measured 6.28 -> 4.06 in 10 steps


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_lora_trains_an_adapter_that_registers_with_its_base_and_survives_a_killed_worker(home, chat, strategy, tmp_path, monkeypatch):
    """method lora: the base frozen, only the factors trained, checkpointed and restored; the result is an adapter version."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    store, engine, _ = home
    registry = ModelRegistry(store, engine)
    base_version = registry.resolve("lm-ddp:1")
    if strategy == "ddp":  # rank 1 dies at step 20, once: the group restarts from an adapter checkpoint (step 8 or 16)
        marker = tmp_path / "killed"
        monkeypatch.setenv(FAULT_ENV, f"1:20:{marker}")
    result = train(TrainConfig(dataset=chat["version"].ref, init_from="lm-ddp:1", method="lora", lora={"rank": 8, "alpha": 16},
                               output_model=f"bot-{strategy}", strategy=strategy, max_steps=24, eval_interval=8, checkpoint_interval=8,
                               **{**FAST, "lr": 2e-2, "log_interval": 8}),
                   storage=store, engine=engine)
    if strategy == "ddp":
        assert marker.exists() and result.metrics["restarts"] == 1, result.history
        assert [h["step"] for h in result.history][-1] == 24

    adapter = registry.resolve(f"bot-{strategy}")
    assert (adapter.task, adapter.parents, adapter.dataset) == ("adapter", ("lm-ddp:1",), chat["version"].ref)
    assert {f.path for f in adapter.files} >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "loss.png"}
    assert not {"model.safetensors", "optimizer.safetensors"} & {f.path for f in adapter.files}
    base_bytes = next(f.size for f in base_version.files if f.path == "model.safetensors")
    adapter_bytes = next(f.size for f in adapter.files if f.path == "adapter_model.safetensors")
    # rank 8 on q_proj and v_proj of 2 layers: 3,584 of the base's ~0.2M parameters
    assert result.parameters > 40 * adapter.metrics["trainable_parameters"] and adapter_bytes < 0.05 * base_bytes
    assert registry.resolve("lm-ddp:1").manifest_sha256 == base_version.manifest_sha256  # the base is untouched

    registry.download(adapter.ref, tmp_path / "adapter")
    base_model = AutoModelForCausalLM.from_pretrained(chat["base"])
    before = answer_loss(base_model, chat)
    tuned = PeftModel.from_pretrained(base_model, str(tmp_path / "adapter"))  # PEFT's own loader takes the version as is
    after = answer_loss(tuned, chat)
    assert result.metrics["val_loss"] == pytest.approx(after, rel=0.05), (result.metrics, after)
    # the answers got likelier with the base frozen: measured 6.281 -> 5.735 (DDP, with its restart) and 5.736 (FSDP);
    # seeded weights and data order leave ~0.001 between runs, far inside the 0.4 margin
    assert after < before - 0.4, (before, after)
    with torch.no_grad():
        frozen = AutoModelForCausalLM.from_pretrained(chat["base"])
        assert torch.equal(tuned.get_base_model().model.embed_tokens.weight, frozen.model.embed_tokens.weight)
    if strategy == "ddp":  # the trained adapter folded into a standalone model answers as base + adapter does
        from lmaas.compress.merge import merge_adapter

        merged = merge_adapter(adapter.ref, "bot-merged", registry).version
        assert (merged.task, merged.parents) == ("causal-lm", ("lm-ddp:1", adapter.ref))
        registry.download(merged.ref, tmp_path / "merged")
        with torch.no_grad():
            ids = chat["ids"][:4]
            difference = (AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits - tuned(input_ids=ids).logits).abs().max()
        assert difference < 1e-4, difference


def test_fine_tune_from_a_registered_model_on_your_own_jsonl(home, trained, tmp_path):
    """init_from: a base model's weights and architecture, a JSONL corpus tokenized with its tokenizer."""
    import json

    store, engine, _ = home
    base, _ = trained("ddp")  # the base: lm-ddp:1, trained on the module's corpus
    registry = ModelRegistry(store, engine)
    exported = tmp_path / "base"
    registry.download("lm-ddp:1", exported)  # what `lmaas models export lm-ddp:1 DIR` writes

    import inspect
    import textwrap

    docs = [{"text": inspect.getsource(f)} for f in vars(textwrap).values() if inspect.isfunction(f)]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in docs * 4))
    same_tok = ingest(IngestConfig(name="mine", sources=[str(jsonl)], text_field="text", tokenizer=str(exported), block_size=128),
                      storage=store, engine=engine).version
    own_tok = ingest(IngestConfig(name="mine-own", sources=[str(jsonl)], text_field="text", vocab_size=512, block_size=128),
                     storage=store, engine=engine).version

    with pytest.raises(InvalidInputError, match="tokenizer has 512 tokens, init_from lm-ddp:1 has vocab_size 1024"):
        train(TrainConfig(dataset=own_tok.ref, init_from="lm-ddp:1", **FAST), storage=store, engine=engine)
    with pytest.raises(NotFoundError):
        train(TrainConfig(dataset=same_tok.ref, init_from="no-such-model", **FAST), storage=store, engine=engine)

    tuned = train(TrainConfig(dataset=same_tok.ref, init_from="lm-ddp:1", output_model="ft-tuned", max_steps=10,
                              eval_interval=10, checkpoint_interval=10, **FAST), storage=store, engine=engine)
    scratch_first = base.history[0]["loss"]  # step 5 of random weights
    # it starts from the base: measured 6.85 (random weights, step 5) vs 5.92 (tuned from a 20-step base, step 5)
    assert tuned.history[0]["loss"] < scratch_first - 0.3, (tuned.history[0], base.history[0])
    mv = registry.resolve("ft-tuned")
    assert (mv.parent, mv.dataset) == ("lm-ddp:1", same_tok.ref) and mv.description.startswith("fine-tune of lm-ddp:1")
    assert "ft-tuned:1" in [c.ref for c in registry.lineage("lm-ddp:1").children]
    assert isinstance(generate(registry, "ft-tuned:1", tmp_path / "gen"), str)
