"""The seam for vLLM on GPU clusters: a `vllm.AsyncLLMEngine` behind the `Engine` contract.

Mapping when it is written: `generate` -> `AsyncLLMEngine.generate(prompt, vllm.SamplingParams(...), request_id)`
(fields of `SamplingParams` map one to one, `logprobs` included), each `RequestOutput` delta -> a `TokenEvent`;
`abort` -> `AsyncLLMEngine.abort(request_id)`; `embed` -> `LLM(task="embed")`. vLLM reads the same model
directories `lmaas.models.save_model` writes. Not implemented here: this machine has no GPU and no vLLM.
"""

from __future__ import annotations

from pathlib import Path

from lmaas.errors import ConfigError
from lmaas.serve.engine.base import Engine, EngineStats


class VLLMEngine(Engine):
    """Placeholder for a vLLM-backed engine; raises a clear error rather than pretending to serve."""

    def __init__(self, model_dir: str | Path, **engine_args: object) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "engine 'vllm' needs the vllm package on a CUDA machine (pip install vllm); use engine 'torch' (CausalLMEngine) elsewhere",
                param="engine",
            ) from exc
        raise ConfigError("engine 'vllm' is not implemented yet; use engine 'torch' (CausalLMEngine)", param="engine")

    def stats(self) -> EngineStats:  # pragma: no cover - never constructed
        raise NotImplementedError
