"""Inference engines: no HTTP and no Ray here; Serve deployments wrap one engine per replica.

    engine = CausalLMEngine("models/tiny-lm", max_batch_size=32, num_threads=2)
    async for event in engine.generate(GenerationRequest("r1", "def f(", SamplingParams(max_tokens=16))):
        print(event.text, end="")
"""

from lmaas.serve.engine.base import AdapterRequest, Engine, EngineStats, GenerationRequest, SamplingParams, TokenEvent, Tokenized, TopLogprob
from lmaas.models.chat import DEFAULT_CHAT_TEMPLATE
from lmaas.serve.engine.causal_lm import CausalLMEngine, new_request_id
from lmaas.serve.engine.embedding import EmbeddingEngine
from lmaas.serve.engine.vllm import VLLMEmbeddingEngine, VLLMEngine

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "AdapterRequest",
    "CausalLMEngine",
    "EmbeddingEngine",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "SamplingParams",
    "TokenEvent",
    "Tokenized",
    "TopLogprob",
    "VLLMEmbeddingEngine",
    "VLLMEngine",
    "new_request_id",
]
