"""Call lmaas from application code through the `openai` package: completion, streaming chat, embeddings.

    export LMAAS_API_KEY=...                                  # `lmaas keys create --scope inference`
    python examples/openai_client.py --model tiny-lm [--embedding-model minilm] [--base-url http://127.0.0.1:8000/v1]

LangChain and similar libraries talk to lmaas through the same client; for example
`langchain_openai.ChatOpenAI(base_url=..., api_key=..., model="tiny-lm")` and
`OpenAIEmbeddings(base_url=..., api_key=..., model="minilm", check_embedding_ctx_length=False)`.
"""

from __future__ import annotations

import argparse
import os
import sys

from openai import APIStatusError, OpenAI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=os.environ.get("LMAAS_URL", "http://127.0.0.1:8000") + "/v1")
    parser.add_argument("--model", required=True, help="a served causal LM (its name or registry reference)")
    parser.add_argument("--embedding-model", help="a served embedding model")
    args = parser.parse_args()
    key = os.environ.get("LMAAS_API_KEY")
    if not key:
        print("error: set LMAAS_API_KEY (create one with `lmaas keys create --scope inference`)", file=sys.stderr)
        return 1
    client = OpenAI(base_url=args.base_url, api_key=key, max_retries=2, timeout=60)
    try:
        print("models:", [m.id for m in client.models.list().data])
        out = client.completions.create(model=args.model, prompt="def fibonacci(n):", max_tokens=24, temperature=0.7, seed=0)
        print(f"completion ({out.usage.completion_tokens} tokens): {out.choices[0].text!r}")
        stream = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": "Write a Python import line."}], max_tokens=24, stream=True,
        )
        print("chat, streamed:", repr("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)))
        if args.embedding_model:
            vectors = [d.embedding for d in client.embeddings.create(model=args.embedding_model, input=["a cat sat", "a dog ran"]).data]
            print(f"embeddings: {len(vectors)} x {len(vectors[0])}, cosine {sum(a * b for a, b in zip(*vectors)):.3f}")
    except APIStatusError as exc:  # OpenAI-style error body: {"error": {"message", "type", "param", "code"}}
        print(f"error: {exc.status_code} {exc.body}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
