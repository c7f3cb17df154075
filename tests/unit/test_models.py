"""The model family: sizes, HF-format save/load, generation from a saved directory."""

from __future__ import annotations

import json

import pytest
import torch

from lmaas.data import tokenizer
from lmaas.errors import InvalidInputError, NotFoundError
from lmaas.models import SIZES, build_model, flops_per_token, load_model, model_config, parameter_count, save_model


@pytest.fixture(scope="module")
def spec():
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    return tokenizer.train_bpe(texts, 300)


def test_tiny_is_a_few_hundred_thousand_parameters_and_sizes_grow():
    config = model_config("tiny", vocab_size=1024, max_seq_len=128, eos_id=0)
    assert 100_000 < parameter_count(build_model(config)) < 500_000
    hidden = [SIZES[s].hidden_size * SIZES[s].num_layers for s in ("tiny", "small", "base", "1b")]
    assert hidden == sorted(hidden)


def test_1b_config_is_over_a_billion_parameters_without_allocating():
    config = model_config("1b", vocab_size=32000, max_seq_len=2048, eos_id=2)
    with torch.device("meta"):
        model = build_model(config, seed=None)
    assert parameter_count(model) > 1_000_000_000
    assert flops_per_token(config, 2048) > 6 * 1e9


def test_same_seed_gives_identical_weights():
    config = model_config("tiny", vocab_size=300, max_seq_len=32, eos_id=0)
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_unknown_size_and_bad_dimensions_are_rejected():
    with pytest.raises(InvalidInputError, match="'huge' is unknown; use one of tiny"):
        model_config("huge", vocab_size=100, max_seq_len=32, eos_id=0)
    with pytest.raises(InvalidInputError, match="vocab_size must be positive"):
        model_config("tiny", vocab_size=0, max_seq_len=32, eos_id=0)


def test_saved_directory_loads_with_transformers_auto_classes_and_generates(tmp_path, spec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = spec.save(tmp_path / "tok")
    config = model_config("tiny", vocab_size=spec.vocab_size, max_seq_len=64, eos_id=spec.eos_id)
    model = build_model(config)
    out = save_model(model, tmp_path / "model", tokenizer_dir=tok_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    loaded = AutoModelForCausalLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok("def f1(x):", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model.eval()(ids).logits, atol=1e-5)
    generated = loaded.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert isinstance(hf_tok.decode(generated[0]), str)
    assert torch.equal(load_model(out)(ids).logits, loaded(ids).logits)


def test_load_refuses_directories_without_safetensors(tmp_path):
    with pytest.raises(NotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="no .safetensors"):
        load_model(tmp_path)
