"""The engine contract: what every inference backend (lmaas's torch engine, vLLM, embeddings) implements.

An engine knows nothing of HTTP or Ray. The OpenAI serving classes (`lmaas.serve.openai_api`) talk to
it only through `Engine`, and Ray Serve deployments wrap one engine per replica.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from lmaas.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request (OpenAI's fields; validated by `check`)."""

    max_tokens: int | None = None
    """Most tokens to generate; None: up to the context length."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 means no top-k cut."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; it is not part of the output."""
    seed: int | None = None
    """The same seed and prompt give the same tokens."""
    n: int = 1
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the k most likely alternatives."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks and tests that need exact lengths)."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    json_schema: str | None = None
    """Structured output: the text is JSON valid under this JSON Schema (the schema as JSON text)."""
    json_object: bool = False
    """Structured output: the text is one JSON object."""
    structured_by: str = "response_format"
    """The request field that asked for the structured output, named in errors about it ("response_format" or "tool_choice")."""

    def structured(self) -> bool:
        return self.json_schema is not None or self.json_object

    def check(self) -> None:
        """Raises InvalidInputError naming the first bad field."""
        if self.n != 1:
            raise InvalidInputError(f"n must be 1 (got {self.n}); send separate requests for several completions", param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be at least 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < -1:
            raise InvalidInputError(f"top_k must be -1, 0 or positive, got {self.top_k}", param="top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidInputError(f"logprobs must be between 0 and 20, got {self.logprobs}", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidInputError(f"{name} must be between -2 and 2, got {getattr(self, name)}", param=name)

    def refuse_unsupported(self, engine: str) -> None:
        """For engines without penalties and structured output: a 400 naming the first such field that is set."""
        if self.structured():
            if self.structured_by == "tool_choice":
                what = 'tool_choice "required" or a named function (structured output)'
            else:
                what = f"response_format {'json_schema' if self.json_schema else 'json_object'}"
            raise InvalidInputError(f"{what} needs the vLLM engine; this model runs on {engine}'s", param=self.structured_by)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidInputError(f"{name} needs the vLLM engine; this model runs on {engine}'s", param=name)


def plan_tokens(prompt_ids: list[int], params: SamplingParams, max_context: int) -> int:
    """How many tokens a request may generate: `max_tokens`, or what the context leaves after the prompt.

    Raises:
        InvalidInputError: an empty prompt, or prompt + max_tokens beyond the context.
    """
    if not prompt_ids:
        raise InvalidInputError("prompt must not be empty", param="prompt")
    room = max_context - len(prompt_ids)
    if room < 1:
        raise InvalidInputError(
            f"prompt is {len(prompt_ids)} tokens; this model's context is {max_context} tokens. Shorten the prompt.", param="prompt"
        )
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens > room:
        raise InvalidInputError(
            f"max_tokens {max_tokens} + prompt {len(prompt_ids)} tokens exceeds the context length {max_context}; "
            f"use max_tokens <= {room}",
            param="max_tokens",
        )
    return max_tokens


@dataclass(frozen=True)
class AdapterRequest:
    """The LoRA adapter version a request runs with, on the base version its deployment serves.

    The gateway fills it in after resolving the request's `model` as the caller's tenant (`serve.adapters`);
    the replica downloads and loads the adapter on first use (`serve.adapters.AdapterCache`), and the engine
    applies it to this request's rows only.
    """

    ref: str
    """`name:version` of the adapter version (registry task `adapter`)."""
    base: str
    """`name:version` of the version it adapts (its registry parent)."""
    tenant: str | None = None
    """The caller's tenant, as which the replica resolves and downloads the adapter (None: an admin)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue: token ids (already templated and tokenized) or text."""

    request_id: str
    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: AdapterRequest | None = None
    """Generate with this LoRA adapter's weights (loaded with `Engine.load_adapter`); None: the base model's."""


@dataclass(frozen=True)
class TopLogprob:
    token: str
    token_id: int
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request, as the stream delivers it.

    `text` is the new output text this token completes (may be "" while a multi-byte character or a
    possible stop string is held back). The last event of a request has `finish_reason` set.
    """

    request_id: str
    token_id: int | None
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    """None while generating; "stop" (EOS or a stop string) or "length" (max_tokens) at the end."""
    token: str | None = None
    """This token's own text (for logprobs)."""
    logprob: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    index: int = 0
    """The choice this token belongs to, when a request asks for several (`n`); engines leave it 0."""
    version: str | None = None
    """`name:version` of the model version generating this request: set on its first event by the replica
    that runs the engine (`replica._stream`), so the gateway names the version that answered, also while
    an alias rolls over; engines leave it None."""


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    max_batch_size: int
    generated_tokens: int
    finished_requests: int
    kv_cache_tokens: int = 0
    """Token slots the KV cache holds now. `CausalLMEngine` has no block allocator: its cache is one padded
    tensor, running requests x the longest sequence among them, so padding counts as used."""
    kv_cache_capacity: int = 0
    """Token slots at full load (max_batch_size x max_context); 0: the engine keeps no KV cache."""


@dataclass(frozen=True)
class Tokenized:
    """A prompt as this model's tokenizer sees it (`/v1/tokenize`)."""

    ids: list[int]
    max_context: int | None
    strs: list[str] | None = None
    """Each token's own string, when asked for."""


class Engine(abc.ABC):
    """An inference backend that one model replica runs.

    `CausalLMEngine` implements it with torch on CPU or one GPU, `VLLMEngine` on top of vLLM's `AsyncLLM`,
    `EmbeddingEngine` for sentence embeddings; the OpenAI layer and the Ray Serve replicas above them do
    not know which one runs.
    """

    kind: str = "lmaas"
    """Which engine this is ("lmaas", "vllm"): shown in a replica's info, never used to branch on."""
    model_id: str
    """The name the engine reports under `/v1/models`."""
    max_context: int | None = None
    """Longest prompt + completion in tokens, when the engine generates."""
    max_adapters: int = 0
    """LoRA adapters the engine holds at once (`load_adapter`); 0: it serves its base model only."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream the tokens of `request`; closing the iterator early aborts the request.

        Raises:
            InvalidInputError: bad sampling parameters, a prompt or max_tokens beyond the context.
        """
        raise InvalidInputError(f"model {self.model_id!r} does not generate text", param="model")

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """One vector per text and the number of input tokens used."""
        raise InvalidInputError(f"model {self.model_id!r} does not compute embeddings", param="model")

    async def load_adapter(self, ref: str, directory: Path) -> None:
        """Load the PEFT LoRA adapter in `directory` under `ref`, for requests whose `adapter.ref` is `ref`.

        The caller (`serve.adapters.AdapterCache`) keeps at most `max_adapters` loaded and unloads one only
        when no request uses it.

        Raises:
            InvalidInputError: the engine serves no adapters, or this adapter does not fit its model.
        """
        raise InvalidInputError(f"model {self.model_id!r} is not served with adapters (set engine.max_adapters)", param="model")

    async def unload_adapter(self, ref: str) -> None:  # noqa: B027 - optional for engines without adapters
        """Free what `load_adapter(ref, ...)` took (an unknown ref is ignored)."""

    def abort(self, request_id: str) -> None:  # noqa: B027 - optional for engines that do not generate
        """Stop a request and free its slot (unknown or finished ids are ignored)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    def healthy(self) -> bool:
        """False once the engine can serve no more requests (its decode loop or engine process died)."""
        return True

    def tokenize_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The prompt token ids of a chat conversation under this model's chat template (`tools`: OpenAI's tool
        definitions, which the template renders into the prompt)."""
        raise InvalidInputError(f"model {self.model_id!r} has no chat template", param="model")

    def generate_chat(
        self, request_id: str, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
        adapter: AdapterRequest | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """Stream the reply to a chat conversation: `tokenize_chat` then `generate` (with `adapter`'s weights, if given).

        One call, so an engine behind a remote handle templates with the same model version that
        generates (a version swap between two calls could otherwise mix tokenizers).
        """
        return self.generate(GenerationRequest(request_id, self.tokenize_chat(messages, tools=tools), params, adapter))

    async def tokenize(
        self, prompt: str | list[dict], *, add_special_tokens: bool = False, add_generation_prompt: bool = True, token_strs: bool = False,
        tools: list[dict] | None = None,
    ) -> Tokenized:
        """The token ids of a text (as `/v1/completions` reads it: no special tokens unless asked) or of a chat
        conversation under the chat template (as `/v1/chat/completions` does, with `tools`), with the model's context length."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise InvalidInputError(f"model {self.model_id!r} has no tokenizer", param="model")
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            ids = self.tokenize_chat(prompt, add_generation_prompt, tools=tools)
        return Tokenized(list(ids), self.max_context, tokenizer.convert_ids_to_tokens(ids) if token_strs else None)

    async def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (special tokens kept, as vLLM's `/detokenize`)."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise InvalidInputError(f"model {self.model_id!r} has no tokenizer", param="model")
        bad = [t for t in ids if not 0 <= t < len(tokenizer)]
        if bad:
            raise InvalidInputError(f"token id {bad[0]} is outside the vocabulary (0..{len(tokenizer) - 1})", param="tokens")
        return tokenizer.decode(ids)

    async def close(self) -> None:  # noqa: B027
        """Stop background work; pending requests end."""
