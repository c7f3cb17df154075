"""Byte-level BPE training, HF-format save/load and the built-in corpus (no Ray)."""

from __future__ import annotations

import json

import pytest

from lmaas.data import corpus
from lmaas.data.tokenizer import EOS, encode_batch, load_pretrained, train_bpe
from lmaas.errors import InvalidInputError, NotFoundError


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [p.read_text() for p in corpus.stdlib_files(15)]


def test_stdlib_corpus_is_found_at_run_time():
    files = corpus.stdlib_files(10)
    assert len(files) == 10 and all(f.suffix == ".py" and f.is_relative_to(corpus.stdlib_dir()) for f in files)
    assert files == sorted(files)
    assert corpus.parse_stdlib_source("stdlib:7") == 7 and corpus.parse_stdlib_source("stdlib") is None
    assert corpus.parse_stdlib_source("/data") is False
    with pytest.raises(InvalidInputError):
        corpus.parse_stdlib_source("stdlib:zero")


def test_training_is_deterministic_and_sized(texts):
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.json == b.json and a.sha256 == b.sha256
    assert a.vocab_size == 400
    assert a.eos_id == json.loads(a.json)["added_tokens"][0]["id"]


def test_round_trip_through_transformers(texts, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = train_bpe(texts, 400)
    spec.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    sample = "def greet(name):\n    return f'héllo {name}'  # ünïcode\n"
    ids = encode_batch(spec.json, [sample])[0]
    assert auto(sample)["input_ids"] == ids == fast(sample)["input_ids"]
    assert auto.decode(ids) == sample  # byte-level: lossless
    assert auto.eos_token == EOS and auto.eos_token_id == spec.eos_id
    assert len(ids) < len(sample.encode())  # merges learned something


def test_reuse_an_existing_tokenizer_directory(texts, tmp_path):
    spec = train_bpe(texts, 300)
    spec.save(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.sha256 == spec.sha256 and loaded.eos_id == spec.eos_id
    with pytest.raises(NotFoundError, match="no tokenizer.json"):
        load_pretrained(tmp_path / "missing")
