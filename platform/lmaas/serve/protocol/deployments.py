"""Request and response schemas of the deployments REST API (`/api/v1/deployments`).

A deployment is created with the body of one `ServedModel` (what one entry of `models:` holds in
deployments/serve.yaml: `ref`, `name`, scaling knobs, `canary`), so the YAML, `lmaas deploy` and
the REST API share one validated schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmaas.serve.options import CanaryOptions


class DeploymentPatch(BaseModel):
    """Fields to change on a deployment; omitted fields keep their value, `canary: null` removes the canary."""

    model_config = ConfigDict(extra="forbid")

    ref: str | None = Field(None, min_length=1, description="A new stable reference.")
    weight: int | None = Field(None, ge=0, le=100, description="The canary's share of traffic in percent (restarts its watch).")
    canary: CanaryOptions | None = Field(None, description="A new canary (replacing the current one), or null to remove it.")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)


class ChangeOut(BaseModel):
    """A requested change and how it went: pending -> applying -> done | failed."""

    id: str
    op: str
    app: str
    name: str | None = None
    actor: str | None = None
    status: str
    requested_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None


class TrafficOut(BaseModel):
    """A deployment's recent requests, counted by the gateway replica that answers (with several gateway replicas, its share)."""

    window_s: float = Field(description="The window, in seconds, ending now.")
    requests: int = Field(description="Requests answered for the deployment (by its name or its reference).")
    requests_per_s: float = Field(description="`requests` / `window_s`.")
    errors: int = Field(description="Of those, answered with a 5xx status.")
    error_rate: float | None = Field(description="`errors` / `requests` (null without requests).")
    ttft_p50_ms: float | None = Field(
        description="Median time from a generation request reaching the gateway to its first token reaching it (null without one).")


class DeploymentOut(BaseModel):
    object: str = "deployment"
    name: str
    ref: str
    tenant: str | None = Field(None, description="The tenant that owns the deployment (None: nobody's yet, e.g. a model not in the registry).")
    serving: str = Field(description="`name:version` a replica serves now (\"-\" when none runs).")
    status: str
    running: int
    min_replicas: int
    max_replicas: int
    multiplexed: bool
    canary: dict[str, Any] | None = Field(None, description="`{ref, weight, state, reason, status}` while a canary is configured.")
    engine: str = Field("-", description="The engine a replica runs: vllm or lmaas (\"-\" when none runs, or multiplexed).")
    change: ChangeOut | None = Field(None, description="The latest change requested for this deployment.")
    traffic: TrafficOut | None = Field(
        None, description="Its requests over the last 5 minutes as the answering gateway replica saw them (null: this app keeps no metrics).")


class DeploymentList(BaseModel):
    object: str = "list"
    data: list[DeploymentOut]
    changes: list[ChangeOut] = Field(default_factory=list, description="Recent changes, oldest first (pending ones included).")


class AcceptedOut(BaseModel):
    """202: the change is queued; `GET /api/v1/deployments` shows when it is done."""

    object: str = "deployment.change"
    change: ChangeOut
    deployment: dict[str, Any] | None = Field(description="The deployment's desired configuration after the change (null: removed).")
