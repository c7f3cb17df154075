"""Deployments REST API under `/api/v1/deployments`: the same operations as `lmaas deploy` / `undeploy` / `deployments`.

    GET    /api/v1/deployments          what is served, with canary splits and recent changes
    GET    /api/v1/deployments/{name}
    POST   /api/v1/deployments          a `ServedModel` body ({"ref", "name", "min_replicas", "canary": {...}}) -> 202
    PATCH  /api/v1/deployments/{name}   {"weight": 20} / {"canary": null} / {"max_replicas": 4} -> 202
    DELETE /api/v1/deployments/{name}   -> 202

Every route needs the `deploy` scope. Changes are applied off the request path (`serve.control`):
the answer is 202 with the desired configuration, and GET shows the change's status. A reference
that does not resolve, or names another tenant's private model, is 404 before anything is queued.

Each deployment has an owner tenant (`serve.records`, shown as `tenant`): a tenant lists and
changes only its own; another tenant's is 404 to PATCH and DELETE, and its name is taken (409) to
POST. Non-admin deployments stay within the tenant caps and set no custom `resources` (403).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from lmaas.auth import DEPLOY, Principal
from lmaas.errors import ConfigError, InvalidInputError, LmaasError, NotFoundError
from lmaas.serve.auth import authenticate, get_auth, require
from lmaas.serve.control import DeploymentControl
from lmaas.serve.options import ServedModel
from lmaas.serve.protocol.deployments import AcceptedOut, ChangeOut, DeploymentList, DeploymentOut, DeploymentPatch, TrafficOut

router = APIRouter(prefix="/api/v1/deployments", tags=["deployments"], dependencies=[require(DEPLOY)])


def _control(request: Request) -> DeploymentControl:
    control = getattr(request.app.state, "deployments", None)
    if control is None:
        raise ConfigError("deployments are managed by the gateway of a Serve app (this app runs without one)", param="deployments")
    return control


def _visible(request: Request, principal: Principal, ref: str) -> bool:
    from lmaas.registry import parse_ref

    auth = get_auth(request)
    return auth is None or auth.visible_model(principal, parse_ref(ref).name)


def _check_ref(request: Request, principal: Principal, ref: str, param: str) -> None:
    """404 unless `ref` resolves in the registry to a model the caller may see."""
    registry = request.app.state.registry
    try:
        if _visible(request, principal, ref):
            registry.check_signature(registry.resolve(ref, tenant=principal.tenant_filter))
            return
    except LmaasError as exc:
        if exc.status != 404:
            raise InvalidInputError(f"{param}: {exc.message}", param=param) from None
    raise NotFoundError(f"{param}: {ref!r} is not a registered model version you can see; see `lmaas models list`", param=param)


def _check(request: Request, principal: Principal, served: ServedModel) -> None:
    _check_ref(request, principal, served.ref, "ref")
    if served.canary is not None:
        _check_ref(request, principal, served.canary.ref, "canary.ref")


def _accepted(change: dict, served: ServedModel | None) -> AcceptedOut:
    return AcceptedOut(change=ChangeOut(**change), deployment=served.model_dump(mode="json") if served is not None else None)


@router.get("", response_model=DeploymentList)
async def list_deployments(request: Request, principal: Principal = Depends(authenticate)) -> DeploymentList:
    control = _control(request)
    deployments, changes = await control.list()
    latest = {c.get("name"): c for c in changes}
    records = control.records
    owners = await run_in_threadpool(lambda: {d["name"]: records.owner(control.app, d["name"], d["ref"]) for d in deployments})
    own = [d for d in deployments if principal.tenant_filter in (None, owners[d["name"]])]
    names = {d["name"] for d in own}
    return DeploymentList(
        data=[DeploymentOut(**d, tenant=owners[d["name"]], change=latest.get(d["name"]), traffic=_traffic(request, d)) for d in own],
        changes=[ChangeOut(**c) for c in changes if c.get("name") in names or principal.is_admin],
    )


def _traffic(request: Request, deployment: dict) -> TrafficOut | None:
    """The deployment's requests of the last 5 minutes, from this gateway replica's own counts (`ops.metrics.RecentRequests`)."""
    recent = getattr(getattr(request.app.state, "metrics", None), "recent", None)
    if recent is None:
        return None
    return TrafficOut(**recent.traffic([deployment["name"], deployment["ref"]]))  # clients may send either as `model`


@router.get("/{name}", response_model=DeploymentOut)
async def get_deployment(request: Request, name: str, principal: Principal = Depends(authenticate)) -> DeploymentOut:
    listing = await list_deployments(request, principal)
    for d in listing.data:
        if d.name == name:
            return d
    raise NotFoundError(f"no deployment named {name!r}; see GET /api/v1/deployments", param="name")


@router.post("", response_model=AcceptedOut, status_code=202)
def create_deployment(request: Request, body: ServedModel, principal: Principal = Depends(authenticate)) -> AcceptedOut:
    """Serve a registered model (or replace the deployment of that name), optionally with a canary."""
    _check(request, principal, body)
    return _accepted(_control(request).submit(principal, "deploy", body.name, body), body)


@router.patch("/{name}", response_model=AcceptedOut, status_code=202)
def update_deployment(request: Request, name: str, body: DeploymentPatch, principal: Principal = Depends(authenticate)) -> AcceptedOut:
    """Change a deployment: its stable reference, replicas, canary or canary weight."""
    control = _control(request)
    current = control.served(name)
    control.check(principal, name, create=False)
    update = body.model_dump(exclude_unset=True, exclude={"weight", "canary"})
    config = current.model_dump() | update
    if "canary" in body.model_fields_set:
        config["canary"] = body.canary.model_dump() if body.canary is not None else None
    if body.weight is not None:
        if config.get("canary") is None:
            raise InvalidInputError(f"weight: deployment {name!r} has no canary; send `canary` with a `ref` first", param="weight")
        config["canary"] = config["canary"] | {"weight": body.weight}
    try:
        served = ServedModel.model_validate(config)
    except ValueError as exc:  # pydantic.ValidationError
        errors = getattr(exc, "errors", lambda: [])()
        param = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0].get("loc") else None
        raise InvalidInputError(f"{param or 'deployment'}: {errors[0]['msg'] if errors else exc}", param=param) from None
    _check(request, principal, served)
    return _accepted(control.submit(principal, "deploy", name, served), served)


@router.delete("/{name}", response_model=AcceptedOut, status_code=202)
def delete_deployment(request: Request, name: str, principal: Principal = Depends(authenticate)) -> AcceptedOut:
    """Stop serving a model (in-flight streams finish first)."""
    control = _control(request)
    control.served(name)
    return _accepted(control.submit(principal, "undeploy", name), None)  # submit refuses another tenant's (404)
