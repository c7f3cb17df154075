"""Serving: HTTP APIs (management REST, the OpenAI-compatible inference API) and Ray Serve apps.

`engine/` runs models (no HTTP, no Ray), `openai_api` holds the OpenAI endpoints' logic and
`openai_app.build_openai_app(engines)` the FastAPI app that Serve ingresses mount; `grpc_api` maps
the gRPC API (`protocol/lmaas.proto`, service `lmaas.v1.Inference`: ListModels, streaming Complete,
Embed) onto the same logic. The Ray Serve app (HTTP on 8000, gRPC on 9000), lowest first: `options` (its args),
`replica` (model replicas and their gateway-side client), `ingress` (the gateway), `app` (the builder) and
`deployments` (the control plane: `lmaas deploy`, the applier of `/api/v1/deployments` changes).

`protocol/` holds pydantic request/response schemas and the `.proto` with its generated modules
(`make proto`), `routers/` thin FastAPI routers that map them onto library calls, `errors` the one
mapping from `LmaasError` to OpenAI-style JSON errors and gRPC status codes.
"""
