"""Serving: HTTP APIs (management REST, the OpenAI-compatible inference API) and Ray Serve apps.

`engine/` runs models (no HTTP, no Ray), `openai_api` holds the OpenAI endpoints' logic and
`openai_app.build_openai_app(engines)` the FastAPI app that Serve ingresses mount.

`protocol/` holds pydantic request/response schemas, `routers/` thin FastAPI routers that map
them onto library calls, `errors` the one mapping from `LmaasError` to OpenAI-style JSON errors.
"""
