"""Model merging as registry operations (`lmaas.compress.merge`): real tiny models, a real registry, no Ray.

Merged weights are compared tensor by tensor with what the method means (the model itself, a weighted
average, an endpoint of the interpolation, base + task vectors), the adapter merge with PEFT's own
base+adapter logits; refusals leave nothing registered, and another tenant's private models are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from registry_helpers import make_adapter_dir, make_model_dir  # noqa: E402
from serve_helpers import make_causal_lm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EVAL = {"eval_tokens": 1024, "threads": 1}  # small held-out sets: the tests check numbers exist and agree, not their size


def open_registry(root: Path, uri: str | None = None, endpoint: str | None = None, db_url: str | None = None):
    from lmaas import db
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage

    return ModelRegistry(Storage(uri or f"file://{root / 'store'}", endpoint_url=endpoint), db.connect(db_url or f"sqlite:///{root / 'lmaas.db'}"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Local directories: a base and two models of its architecture and tokenizer (other weights), a LoRA adapter of the base."""
    root = tmp_path_factory.mktemp("merge-models")
    dirs = {name: make_causal_lm(root / name, seed=seed) for name, seed in (("base", 0), ("a", 1), ("b", 2))}
    dirs["lora"] = make_adapter_dir(root / "lora", dirs["base"], seed=3)
    return dirs


@pytest.fixture(scope="module")
def registry(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """A file + SQLite registry holding lm-base:1, lm-a:1, lm-b:1 and the adapter lm-lora:1 (parent lm-base:1)."""
    registry = open_registry(tmp_path_factory.mktemp("merge-registry"))
    for name in ("base", "a", "b"):
        registry.register_version(f"lm-{name}", models[name], task="causal-lm")
    registry.register_version("lm-lora", models["lora"], task="adapter", parent="lm-base:1")
    return registry


def config(**fields):
    from lmaas.compress.merge import MergeConfig

    return MergeConfig(**{**EVAL, **fields})


def tensors_of(registry, ref: str, tmp_path: Path) -> dict:
    from safetensors.torch import load_file

    out = tmp_path / ref.replace(":", "-")
    registry.download(ref, out)
    return load_file(str(out / "model.safetensors"))


def local_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(params=["file-sqlite", "s3-postgresql"])
def any_registry(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty registry on local files + SQLite, then on the S3 server + PostgreSQL."""
    if request.param == "file-sqlite":
        return open_registry(tmp_path)
    s3 = request.getfixturevalue("s3_server")
    return open_registry(tmp_path, s3.uri(f"t-{os.urandom(5).hex()}"), s3.endpoint, request.getfixturevalue("postgres_url"))


def test_a_linear_merge_of_a_model_with_itself_is_the_model(any_registry, models, tmp_path: Path):
    from lmaas.compress.merge import merge

    registry = any_registry
    registry.register_version("lm", models["a"], task="causal-lm")
    lines: list[str] = []
    result = merge(config(models=["lm", "lm:1"], output_model="lm-soup"), registry, progress=lines.append)
    assert result.version.ref == "lm-soup:1" and result.version.task == "causal-lm"
    merged, original = tensors_of(registry, "lm-soup:1", tmp_path), local_tensors(models["a"])
    assert merged.keys() == original.keys()
    unequal = [name for name in original if not (merged[name].dtype == original[name].dtype and merged[name].equal(original[name]))]
    assert unequal == []
    out = tmp_path / "lm-soup-1"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (models["a"] / name).read_bytes()
    report = json.loads((out / "merge.json").read_text())
    assert report == result.report and report["method"] == "linear" and report["parameters"] == {"weights": [0.5, 0.5]}
    (row,) = report["eval"]  # no dataset recorded: one fixed held-out sample
    assert row["data"] == "fixed-sample" and row["merged"]["loss"] == row["parents"]["lm:1"]["loss"]
    assert result.version.metrics["merged_loss/fixed-sample"] == row["merged"]["loss"]
    lineage = registry.lineage("lm-soup:1")
    assert [p.ref for p in lineage.parents] == ["lm:1"]  # the same parent twice is recorded once
    assert [c.ref for c in registry.lineage("lm:1").children] == ["lm-soup:1"]
    assert any(line.startswith("linear merge of lm:1, lm:1") for line in lines) and lines[-1] == "registering lm-soup"


def test_a_linear_merge_is_the_normalized_weighted_average(registry, models, tmp_path: Path):
    from lmaas.compress.merge import merge

    result = merge(config(models=["lm-a", "lm-b"], weights=[1, 3], output_model="soup-13", alias="staging"), registry)
    assert result.report["parameters"]["weights"] == [0.25, 0.75]
    merged = tensors_of(registry, "soup-13:1", tmp_path)
    a, b = local_tensors(models["a"]), local_tensors(models["b"])
    worst = max(float((merged[n] - (0.25 * a[n] + 0.75 * b[n])).abs().max()) for n in a)
    assert worst < 1e-6
    assert [p.ref for p in registry.lineage("soup-13:1").parents] == ["lm-a:1", "lm-b:1"]
    assert registry.resolve("soup-13@staging").ref == "soup-13:1"
    (row,) = result.report["eval"]
    assert set(row["parents"]) == {"lm-a:1", "lm-b:1"}
    assert row["merged"]["loss_vs_best_parent"] == pytest.approx(row["merged"]["loss"] - min(p["loss"] for p in row["parents"].values()))


def test_slerp_starts_at_the_first_model_and_keeps_the_norm(registry, models, tmp_path: Path):
    import torch

    from lmaas.compress.merge import merge, slerp

    merge(config(method="slerp", models=["lm-a", "lm-b"], t=0.0, output_model="slerp-0"), registry)
    merged, a, b = tensors_of(registry, "slerp-0:1", tmp_path), local_tensors(models["a"]), local_tensors(models["b"])
    assert all(merged[n].equal(a[n]) for n in a)
    name = "model.layers.0.mlp.up_proj.weight"  # two random matrices: nearly orthogonal, about the same norm
    assert slerp(1.0, a[name], b[name]).equal(b[name])
    middle, linear = slerp(0.5, a[name], b[name]), 0.5 * a[name] + 0.5 * b[name]
    norm = (float(a[name].norm()) + float(b[name].norm())) / 2
    assert abs(float(middle.norm()) / norm - 1) < 0.02  # on the arc, where the average shrinks toward 1/sqrt(2)
    assert float(linear.norm()) / norm < 0.75
    assert slerp(0.3, a[name], a[name]).allclose(a[name])  # parallel: linear interpolation, no division by sin(0)
    assert torch.isfinite(slerp(0.5, a[name], torch.zeros_like(a[name]))).all()


def test_task_vector_merges_add_to_the_base(registry, models, tmp_path: Path):
    from lmaas.compress.merge import merge, merge_tensors, tensor_index

    a, b, base = (local_tensors(models[k]) for k in ("a", "b", "base"))
    merge(config(method="task_arithmetic", models=["lm-a", "lm-b"], base="lm-base", weights=[1, 1], output_model="lm-sum"), registry)
    summed = tensors_of(registry, "lm-sum:1", tmp_path)
    assert max(float((summed[n] - (a[n] + b[n] - base[n])).abs().max()) for n in a) < 1e-6

    ties = merge(config(method="ties", models=["lm-a", "lm-b"], base="lm-base", density=0.2), registry)
    assert ties.version.ref == "lm-a-ties:1"
    assert [p.ref for p in registry.lineage("lm-a-ties:1").parents] == ["lm-a:1", "lm-b:1", "lm-base:1"]
    merged = tensors_of(registry, "lm-a-ties:1", tmp_path)
    assert {n: t.shape for n, t in merged.items()} == {n: t.shape for n, t in a.items()}
    name = "model.layers.0.mlp.up_proj.weight"
    changed = float((merged[name] != base[name]).float().mean())
    assert 0.2 <= changed <= 0.4  # each task vector trimmed to its top 20%: at most their union moves off the base

    dare = config(method="dare_ties", models=["lm-a", "lm-b"], base="lm-base", density=0.5, seed=7, output_model="lm-dare")
    result = merge(dare, registry)
    assert result.report["parameters"] == {"weights": [1.0, 1.0], "density": 0.5, "majority_sign": "total", "seed": 7}
    registered = tensors_of(registry, "lm-dare:1", tmp_path)
    index = {k: tensor_index(models[k]) for k in ("a", "b", "base")}
    again = merge_tensors(dare, [index["a"], index["b"]], index["base"])
    assert all(again[n].equal(registered[n]) for n in a)  # seeded: the same merge every time
    other = merge_tensors(dare.model_copy(update={"seed": 8}), [index["a"], index["b"]], index["base"])
    assert not other[name].equal(registered[name])


def test_merge_adapter_matches_base_plus_adapter(registry, models, tmp_path: Path):
    import torch
    from peft import PeftModel

    from lmaas.compress.merge import merge_adapter
    from lmaas.models import load_model

    result = merge_adapter("lm-lora", "lm-standalone", registry, eval_tokens=1024)
    assert result.version.task == "causal-lm"
    assert [p.ref for p in registry.lineage("lm-standalone:1").parents] == ["lm-base:1", "lm-lora:1"]
    out = tmp_path / "standalone"
    registry.download("lm-standalone:1", out)
    assert not (out / "adapter_config.json").exists()
    ids = torch.randint(0, 512, (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = PeftModel.from_pretrained(load_model(models["base"]), str(models["lora"])).eval()(input_ids=ids).logits
        merged = load_model(out)(input_ids=ids).logits
        base = load_model(models["base"])(input_ids=ids).logits
    assert float((merged - expected).abs().max()) < 1e-4
    assert float((base - expected).abs().max()) > 1e-2  # the adapter changes the model: the check above is not vacuous
    assert result.report["max_abs_logit_diff"] < 1e-4
    (row,) = result.report["eval"]
    assert set(row["parents"]) == {"lm-base:1", "lm-lora:1"}
    assert row["merged"]["loss"] == pytest.approx(row["parents"]["lm-lora:1"]["loss"], abs=1e-5)


def test_what_cannot_be_merged_is_refused_before_anything_is_registered(registry, models, tmp_path: Path):
    from pydantic import ValidationError

    from lmaas.compress.merge import merge, merge_adapter
    from lmaas.errors import InvalidInputError
    from lmaas.models import load_model
    from lmaas.models.quantized import save_quantized

    registry.register_version("small16", make_model_dir(tmp_path / "s16", seed=1, size=16), task="causal-lm")
    registry.register_version("small32", make_model_dir(tmp_path / "s32", seed=1, size=32), task="causal-lm")
    other_tok = tmp_path / "other-tok"
    shutil.copytree(models["b"], other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens trade ids: same size, another tokenizer
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    registry.register_version("lm-other-tok", other_tok, task="causal-lm")
    save_quantized(load_model(models["a"]), tmp_path / "q", "int8-dynamic", tokenizer_dir=models["a"])
    registry.register_version("lm-a-int8", tmp_path / "q", task="causal-lm", parent="lm-a:1")
    before = {m.name: m.latest_version for m in registry.list_models()}

    refusals = [
        (dict(models=["small16", "small32"]), r"small32:1 has vocab_size 32 in config.json, small16:1 has 16"),
        (dict(models=["lm-a", "lm-other-tok"]), r"lm-other-tok:1 has another tokenizer than lm-a:1 \(token '.+' is id \d+ in lm-other-tok:1, \d+ in"),
        (dict(models=["lm-a", "lm-a-int8"]), r"lm-a-int8:1 is quantized; merge full-precision weights \(its parent lm-a:1\)"),
        (dict(models=["lm-a", "lm-lora"]), r"lm-lora:1 is a LoRA adapter; merge it into its base first \(lmaas models merge-adapter"),
    ]
    for fields, message in refusals:
        with pytest.raises(InvalidInputError, match=message):
            merge(config(output_model="never", **fields), registry, workdir=tmp_path)
    with pytest.raises(InvalidInputError, match="lm-a:1 is a causal-lm model, not a LoRA adapter"):
        merge_adapter("lm-a", "never", registry)
    for fields, message in [
        (dict(method="slerp", models=["lm-a", "lm-b", "lm-a"]), "slerp interpolates exactly two models; got 3"),
        (dict(method="ties", models=["lm-a", "lm-b"]), "set base to the model they were fine-tuned from"),
        (dict(models=["lm-a", "lm-b"], weights=[1.0]), "weights has 1 values for 2 models"),
        (dict(models=["lm-a", "lm-b"], density=0.3), "density applies to ties, dare_linear, dare_ties, not linear"),
    ]:
        with pytest.raises(ValidationError, match=message):
            config(**fields)
    assert {m.name: m.latest_version for m in registry.list_models()} == before
    assert list(tmp_path.glob("lmaas-merge-*")) == []  # scratch removed


def test_gpt2_models_of_other_context_lengths_name_the_tensor(registry, models, tmp_path: Path):
    """The tensor check on an architecture whose position table is a weight: `n_positions` is no ARCHITECTURE_FIELD."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmaas.compress.merge import merge
    from lmaas.errors import InvalidInputError
    from lmaas.models.family import copy_tokenizer

    for name, positions in (("gpt-128", 128), ("gpt-64", 64)):
        gpt = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=512, n_embd=32, n_layer=1, n_head=2, n_positions=positions))
        gpt.save_pretrained(tmp_path / name)
        copy_tokenizer(models["a"], tmp_path / name)
        registry.register_version(name, tmp_path / name, task="causal-lm")
    with pytest.raises(InvalidInputError, match=r"tensor transformer.wpe.weight is \[64, 32\] in gpt-64:1, \[128, 32\] in gpt-128:1"):
        merge(config(models=["gpt-128", "gpt-64"]), registry)
    with pytest.raises(InvalidInputError, match="gpt-128:1 has architectures"):
        merge(config(models=["lm-a", "gpt-128"]), registry)
    assert "gpt-128-linear" not in {m.name for m in registry.list_models()}


def test_another_tenant_cannot_merge_private_models(models, tmp_path: Path):
    from lmaas.compress.merge import check_merge, merge, merge_adapter
    from lmaas.errors import AlreadyExistsError, NotFoundError

    registry = open_registry(tmp_path)
    registry.register_version("acme-lm", models["base"], task="causal-lm", tenant="acme")
    registry.register_version("acme-lora", models["lora"], task="adapter", parent="acme-lm:1", tenant="acme")
    registry.register_version("acme-shared", models["b"], task="causal-lm", tenant="acme")
    registry.set_public("acme-shared", True)
    registry.register_version("evil-lm", models["a"], task="causal-lm", tenant="evil")
    with pytest.raises(NotFoundError) as missing:
        registry.resolve("ghost-lm", tenant="evil")

    attempts = [
        lambda: merge(config(models=["acme-lm", "acme-lm"], output_model="stolen"), registry, tenant="evil"),
        lambda: merge(config(models=["evil-lm", "acme-lm"], output_model="stolen"), registry, tenant="evil"),
        lambda: merge(config(method="ties", models=["evil-lm"], base="acme-lm", output_model="stolen"), registry, tenant="evil"),
        lambda: merge(config(models=["acme-lm:1", "evil-lm"], output_model="stolen"), registry.acting_for("evil")),
        lambda: merge_adapter("acme-lora", "stolen", registry, tenant="evil"),
    ]
    for attempt in attempts:
        with pytest.raises(NotFoundError) as refused:
            attempt()
        assert refused.value.message.replace("acme-lm", "ghost-lm").replace("acme-lora", "ghost-lm") == missing.value.message
    with pytest.raises(AlreadyExistsError):  # nor write its merge into acme's model
        merge(config(models=["evil-lm", "evil-lm"], output_model="acme-lm"), registry, tenant="evil")
    # acme's public model is there to merge for evil, and the merge is evil's
    assert [v.ref for v in check_merge(config(models=["evil-lm", "acme-shared"]), registry, tenant="evil").models] == ["evil-lm:1", "acme-shared:1"]

    assert [m.name for m in registry.list_models(tenant="evil")] == ["acme-shared", "evil-lm"]
    assert [c.ref for c in registry.lineage("acme-lm:1").children] == ["acme-lora:1"]
    assert registry.lineage("acme-lora:1").children == ()
    for ref in ("acme-lm:1", "acme-lora:1"):
        registry.verify(ref)  # the files are unchanged
    assert [v.version for v in registry.list_versions("acme-lm")] == [1]
    own = merge(config(models=["acme-lm", "acme-shared"], output_model="acme-soup"), registry, tenant="acme")
    assert own.version.tenant == "acme" and registry.get_model("acme-soup").tenant == "acme"


def test_the_cli_merges_and_refuses_in_one_line(cli, lmaas_env, models):
    from lmaas.config import load_settings
    from lmaas.registry import ModelRegistry

    Path(lmaas_env["LMAAS_HOME"]).mkdir(parents=True)
    registry = ModelRegistry.from_settings(load_settings())  # the registry of lmaas_env's LMAAS_HOME
    registry.register_version("cli-lm", models["a"], task="causal-lm")
    registry.register_version("cli-other", models["b"], task="causal-lm")
    done = cli("models", "merge", "cli-lm", "cli-other", "--weights", "0.25,0.75", "--output", "cli-soup",
               "--set", "eval_tokens=1024", env=lmaas_env)
    assert done.returncode == 0, done.stderr
    assert "registered cli-soup:1 from cli-lm:1, cli-other:1 (linear)" in done.stdout and "held-out loss" in done.stdout
    version = registry.resolve("cli-soup:1")
    assert version.parents == ("cli-lm:1", "cli-other:1") and json.loads(registry.read_file("cli-soup:1", "merge.json")[1])[
        "parameters"] == {"weights": [0.25, 0.75]}
    for args, message in [
        (("merge", "cli-lm", "ghost", "--output", "cli-x"), "error: no model named 'ghost'"),
        (("merge-adapter", "cli-lm"), "error: cli-lm:1 is a causal-lm model, not a LoRA adapter"),
    ]:
        failed = cli("models", *args, env=lmaas_env)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert failed.stderr.strip().count("\n") == 0 and failed.stderr.startswith(message), failed.stderr
    assert [m.name for m in registry.list_models()] == ["cli-lm", "cli-other", "cli-soup"]


def test_the_shipped_merge_config_is_valid():
    from lmaas.compress.merge import MergeConfig
    from lmaas.config import load_config

    cfg = load_config(MergeConfig, REPO / "jobs" / "configs" / "merge_linear.yaml")
    assert cfg.method == "linear" and cfg.models == ["code-a", "code-b"] and cfg.merge_weights() == [0.5, 0.5]
    ties = load_config(MergeConfig, REPO / "jobs" / "configs" / "merge_linear.yaml", ["method=ties", "base=tiny-lm:1"])
    assert ties.parameters() == {"weights": [1.0, 1.0], "density": 0.5, "majority_sign": "total"}
