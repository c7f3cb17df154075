"""Serving: HTTP APIs (management REST, later the OpenAI-compatible inference API) and Ray Serve apps.

`protocol/` holds pydantic request/response schemas, `routers/` thin FastAPI routers that map
them onto library calls, `errors` the one mapping from `LmaasError` to OpenAI-style JSON errors.
"""
