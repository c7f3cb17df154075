"""Importing Hugging Face causal LMs of every architecture lmaas serves (issue 22, "Import any HF causal LM directory").

Each model is built with transformers' own config class and saved with `save_pretrained` (there is
no hub to download from here), beside a BPE tokenizer trained on stdlib source. A registered
version downloads, loads with transformers, and lmaas's engine and vLLM generate what
transformers' `generate` does, greedily. What the registry refuses (a model that would run its own
code, an architecture outside the list, weights that do not fit their config, no tokenizer) is a
clear error naming the problem, and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import HF_ARCHITECTURES, make_hf_causal_lm  # noqa: E402

from lmaas import db  # noqa: E402
from lmaas.errors import InvalidInputError  # noqa: E402
from lmaas.models.hf import ARCHITECTURES  # noqa: E402
from lmaas.registry import ModelRegistry  # noqa: E402
from lmaas.registry.entities import ModelFile  # noqa: E402
from lmaas.storage import Storage  # noqa: E402

PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {t: make_hf_causal_lm(root / t, t, seed=1, initializer_range=0.5) for t in HF_ARCHITECTURES}


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    return ModelRegistry(Storage(f"file://{tmp_path / 'store'}"), db.connect(f"sqlite:///{tmp_path / 'lmaas.db'}"))


def hf_greedy(model_dir: Path, n: int = 8) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def engine_greedy(engine, n: int = 8) -> list[int]:
    from lmaas.serve.engine.base import GenerationRequest, SamplingParams

    async def run() -> list[int]:
        request = GenerationRequest("r", PROMPT, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return [event.token_id async for event in engine.generate(request)]

    try:
        return asyncio.run(run())
    finally:
        asyncio.run(engine.close())


def test_the_architectures_the_tests_build_are_the_ones_lmaas_takes():
    assert sorted(HF_ARCHITECTURES) == sorted(ARCHITECTURES.values())


@pytest.mark.parametrize("model_type", HF_ARCHITECTURES)
def test_each_architecture_registers_downloads_and_generates_what_transformers_generates(models, registry, tmp_path, model_type):
    from lmaas.serve.engine.causal_lm import CausalLMEngine

    version = registry.register_version(f"imported-{model_type}", models[model_type], task="causal-lm")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.path for f in version.files}
    out = tmp_path / "out"
    registry.download(version.ref, out)
    expected = hf_greedy(models[model_type])
    assert len(set(expected)) > 2  # a random model whose greedy output varies: the comparison means something
    assert hf_greedy(out) == expected
    assert engine_greedy(CausalLMEngine(out, max_batch_size=2, num_threads=1)) == expected


def test_vllm_serves_an_imported_gpt2_as_transformers_generates(models):
    """GPT-2, the architecture furthest from Llama (absolute positions, fused QKV, `n_*` config names), through vLLM on CPU.

    (Mistral, Qwen2 and Qwen3 gave transformers' tokens through vLLM too when checked by hand; one engine
    start costs about 15 s of the suite, so the suite starts one.)
    """
    pytest.importorskip("vllm", reason="vLLM is part of make test's install (.[test,vllm])")
    from lmaas.serve.engine.vllm import VLLMEngine, unsupported

    assert unsupported(models["gpt2"]) is None
    assert engine_greedy(VLLMEngine(models["gpt2"], max_batch_size=2)) == hf_greedy(models["gpt2"])


def _edited(src: Path, dest: Path, name: str, change) -> Path:
    shutil.copytree(src, dest)
    data = json.loads((dest / name).read_text())
    change(data)
    (dest / name).write_text(json.dumps(data))
    return dest


def refusals(models: dict[str, Path], root: Path) -> list[tuple[Path, str]]:
    """(directory, words the error must say) for each kind of directory the registry refuses."""
    llama = models["llama"]
    neox = root / "neox"
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2)).save_pretrained(neox)
    shutil.copy(llama / "tokenizer.json", neox)
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(llama, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    return [
        (_edited(llama, root / "remote", "config.json", lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})),
         "trust_remote_code"),
        (_edited(llama, root / "remote-tok", "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["tok_x.XTokenizer", None]})),
         "tokenizer_config.json asks to run the model's own code"),
        (neox, "architecture GPTNeoXForCausalLM is not one lmaas serves; use one of LlamaForCausalLM, MistralForCausalLM"),
        (_edited(llama, root / "wider", "config.json", lambda c: c.update(intermediate_size=256)), "this config.json needs [256, 64]"),
        (_edited(llama, root / "renamed", "config.json", lambda c: c.update(model_type="qwen2")), "model_type 'qwen2' does not match"),
        (no_tokenizer, "no tokenizer"),
    ]


def test_what_is_refused_says_why_and_stores_nothing(models, registry, tmp_path):
    for directory, words in refusals(models, tmp_path):
        with pytest.raises(InvalidInputError) as caught:
            registry.register_version("bad", directory, task="causal-lm")
        assert words in str(caught.value) and caught.value.param == "files", (directory.name, str(caught.value))
        assert "\n" not in str(caught.value)
    assert registry.list_models() == [] and registry.storage.list("models") == []
    # the same directory as task `other` is the user's business: lmaas does not serve it as an LM
    assert registry.register_version("kept", tmp_path / "remote", task="other").ref == "kept:1"


def test_a_two_step_upload_of_a_model_with_its_own_code_is_refused_at_commit(models, registry, tmp_path):
    """The check runs in the library on the stored files too (here sealed, so it reads them decrypted)."""
    import os

    sealed = ModelRegistry(registry.storage, registry.engine, encryption_key=os.urandom(32))
    src = _edited(models["qwen2"], tmp_path / "remote", "config.json", lambda c: c.update(auto_map={"AutoConfig": "x.Config"}))
    files = [ModelFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in sorted(src.iterdir())]
    upload_id = sealed.begin_upload("remote", files)
    for f in files:
        with open(src / f.path, "rb") as data:
            sealed.put_upload_file(upload_id, f.path, data)
    with pytest.raises(InvalidInputError, match="trust_remote_code"):
        sealed.commit_upload(upload_id, task="causal-lm")
    assert sealed.list_models() == []
    fine = models["qwen2"]
    ok = [ModelFile(p.name, hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in sorted(fine.iterdir())]
    second = sealed.begin_upload("qwen", ok)
    for f in ok:
        with open(fine / f.path, "rb") as data:
            sealed.put_upload_file(second, f.path, data)
    assert sealed.commit_upload(second, task="causal-lm").ref == "qwen:1"
