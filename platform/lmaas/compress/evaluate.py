"""The evaluation report of a variant against its parent, on the same held-out tokens and prompts.

Quality: validation perplexity of both, and greedy next-token agreement (the share of held-out
positions where the variant's argmax equals the parent's). Cost: weights-file size, parameter
count and sparsity, single-request decode latency and batched decode throughput, measured
interleaved (parent, variant, parent, ...) so machine noise hits both alike.
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lmaas.errors import NotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from lmaas.registry import ModelRegistry, ModelVersion


@dataclass
class EvalData:
    """Held-out token rows `[rows, seq_len]` and decode prompts `[batch, prompt_len]`, shared by parent and variant."""

    ids: torch.Tensor
    prompts: torch.Tensor
    source: str
    """Where the tokens came from: `dataset name:N validation` or `fixed sample (module)`."""


def held_out_data(version: "ModelVersion", registry: "ModelRegistry", model_dir: Path, *, tokens: int, seq_len: int,
                  batch_size: int, max_seq_len: int) -> EvalData:
    """The parent's dataset validation split if it names one that has rows, else a fixed sample of stdlib source.

    A registry acting for a tenant (`ModelRegistry.acting_for`) reads only that tenant's datasets:
    another tenant's public model is evaluated on the fixed sample, never on its owner's data.

    Raises:
        NotFoundError: the named dataset is missing (and it is the parent's owner's to read).
    """
    seq_len = min(seq_len, max_seq_len)
    readable = version.dataset and registry.tenant in (None, version.tenant)
    flat = _validation_tokens(version.dataset, registry, tokens) if readable else []
    source = f"{version.dataset} validation"
    if not flat:
        flat = _fixed_sample_tokens(model_dir, tokens)
        why = (f"; {version.dataset} has no validation rows" if readable else "; its dataset is another tenant's") if version.dataset else ""
        source = f"fixed sample (stdlib difflib source{why})"
    flat = flat[:tokens]
    if len(flat) < 16:
        raise NotFoundError(f"held-out data ({source}) has only {len(flat)} tokens; need more to evaluate")
    seq_len = min(seq_len, len(flat))
    rows = len(flat) // seq_len
    ids = torch.tensor(flat[: rows * seq_len], dtype=torch.long).reshape(rows, seq_len)
    prompt_len = min(8, seq_len // 2)
    offsets = [(i // rows) * prompt_len % (seq_len - prompt_len + 1) for i in range(batch_size)]
    prompts = torch.stack([ids[i % rows, offsets[i] : offsets[i] + prompt_len] for i in range(batch_size)])
    return EvalData(ids=ids, prompts=prompts, source=source)


def _validation_tokens(dataset_ref: str, registry: "ModelRegistry", tokens: int) -> list[int]:
    import pyarrow.parquet as pq

    from lmaas.data.feed import shard_paths
    from lmaas.data.versions import get_version

    dataset = get_version(registry.engine, dataset_ref, tenant=registry.tenant)
    paths = shard_paths(dataset, registry.storage, "validation")
    filesystem, _ = registry.storage.pyarrow_filesystem()
    flat: list[int] = []
    for path in sorted(paths):
        for row in pq.read_table(path, filesystem=filesystem, columns=["input_ids"]).column("input_ids").to_pylist():
            flat += row
            if len(flat) >= tokens:
                return flat
    return flat


def training_batches(dataset_ref: str, registry: "ModelRegistry", *, batch_size: int, seq_len: int, seed: int):
    """An endless iterator of `[batch_size, seq_len]` token batches from a dataset's train split (shuffled rows)."""
    import pyarrow.parquet as pq

    from lmaas.data.feed import shard_paths
    from lmaas.data.versions import get_version

    dataset = get_version(registry.engine, dataset_ref, tenant=registry.tenant)
    paths = shard_paths(dataset, registry.storage, "train")
    if not paths:
        raise NotFoundError(f"dataset {dataset.ref} has no train shards for recovery fine-tuning")
    filesystem, _ = registry.storage.pyarrow_filesystem()
    rows = [r[:seq_len] for p in sorted(paths) for r in pq.read_table(p, filesystem=filesystem, columns=["input_ids"]).column("input_ids").to_pylist()]
    data = torch.tensor(rows, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (batch_size,), generator=gen)]


def _fixed_sample_tokens(model_dir: Path, tokens: int) -> list[int]:
    import difflib

    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise NotFoundError(f"{model_dir}: no tokenizer.json to tokenize the fixed evaluation sample with; "
                            "register the model with its tokenizer or with a dataset")
    return Tokenizer.from_file(str(path)).encode(inspect.getsource(difflib)).ids[: tokens + 1]


@torch.inference_mode()
def logits_of(model: "PreTrainedModel", ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([model(input_ids=ids[i : i + batch], use_cache=False).logits.float() for i in range(0, len(ids), batch)])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood)."""
    nll = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def agreement(logits: torch.Tensor, parent_logits: torch.Tensor) -> float:
    """Share of positions where the greedy next token matches the parent's."""
    return float((logits.argmax(-1) == parent_logits.argmax(-1)).float().mean())


@torch.inference_mode()
def decode_seconds(model: "PreTrainedModel", prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds to greedily generate exactly `new_tokens` for every row of `prompts`."""
    start = time.perf_counter()
    length = prompts.shape[1] + new_tokens
    model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_length=length, min_length=length,
                   do_sample=False, pad_token_id=model.config.eos_token_id)
    return time.perf_counter() - start


def timings(models: dict[str, "PreTrainedModel"], prompts: torch.Tensor, *, new_tokens: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median single-request ms/token and batched tokens/s of each model, measured interleaved."""
    single: dict[str, list[float]] = {k: [] for k in models}
    batched: dict[str, list[float]] = {k: [] for k in models}
    for model in models.values():  # warm-up: first-call allocations and kernel selection
        decode_seconds(model, prompts[:1], 2)
    for _ in range(repeats):
        for key, model in models.items():
            single[key].append(decode_seconds(model, prompts[:1], new_tokens) / new_tokens * 1000)
            batched[key].append(prompts.shape[0] * new_tokens / decode_seconds(model, prompts, new_tokens))
    return {k: {"latency_ms_per_token": statistics.median(single[k]), "batch_tokens_per_s": statistics.median(batched[k])}
            for k in models}


def weight_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, zeros among them), counting quantized weights as the values they stand for."""
    from lmaas.models.quantized import Int4WeightLinear

    total = zeros = 0
    seen: set[int] = set()
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + [
            (n, b) for n, b in module.named_buffers(recurse=False) if n == "weight"]
        for _, t in tensors:
            if id(t) in seen or t.dtype == torch.bool:
                continue
            seen.add(id(t))
            factor = 2 if isinstance(module, Int4WeightLinear) else 1
            total += t.numel() * factor
            if not isinstance(module, Int4WeightLinear):
                zeros += int((t == 0).sum())
    return total, zeros


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def evaluate(variant: "PreTrainedModel", parent: "PreTrainedModel", data: EvalData, *, variant_dir: Path, parent_dir: Path,
             new_tokens: int, repeats: int) -> dict[str, Any]:
    """The report's numbers: `{"variant": {...}, "parent": {...}, "ratios": {...}, "data": ...}`."""
    parent_logits = logits_of(parent, data.ids)
    variant_logits = logits_of(variant, data.ids)
    speed = timings({"parent": parent, "variant": variant}, data.prompts, new_tokens=new_tokens, repeats=repeats)
    sides = {}
    for key, model, logits, directory in (("parent", parent, parent_logits, parent_dir), ("variant", variant, variant_logits, variant_dir)):
        params, zeros = weight_count(model)
        sides[key] = {
            "size_bytes": weights_bytes(directory),
            "parameters": params,
            "sparsity": zeros / max(params, 1),
            "perplexity": perplexity(logits, data.ids),
            **speed[key],
        }
    sides["variant"]["agreement"] = agreement(variant_logits, parent_logits)
    p, v = sides["parent"], sides["variant"]
    ratios = {
        "size_ratio": v["size_bytes"] / p["size_bytes"],
        "perplexity_increase": v["perplexity"] / p["perplexity"] - 1,
        "decode_speedup": p["latency_ms_per_token"] / v["latency_ms_per_token"],
        "throughput_ratio": v["batch_tokens_per_s"] / p["batch_tokens_per_s"],
    }
    return {"variant": v, "parent": p, "ratios": ratios,
            "data": {"source": data.source, "rows": data.ids.shape[0], "seq_len": data.ids.shape[1],
                     "prompts": data.prompts.shape[0], "decode_tokens": new_tokens, "threads": torch.get_num_threads()}}
