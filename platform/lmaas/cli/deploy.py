"""`lmaas deploy` / `undeploy` / `deployments`: registry models behind the OpenAI API on the Ray cluster.

    ray start --head && export RAY_ADDRESS=auto       # deployments outlive this command: they need a cluster
    lmaas deploy tiny-lm@production --min-replicas 0 --max-replicas 2
    lmaas deploy tiny-lm@production --canary tiny-lm:7 --weight 10 --sticky --promote-after 10m
    lmaas deployments                                  # the canary column: ref, weight, state
    LMAAS_URL=https://gw.example LMAAS_API_KEY=... lmaas deployments   # a remote gateway's, over its REST API
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d '{"model": "tiny-lm", "prompt": "def"}'
    grpcurl -plaintext -d '{"model": "tiny-lm", "prompt": "def"}' 127.0.0.1:9000 lmaas.v1.Inference/Complete
    lmaas logs tiny-lm --tail 20                     # replica logs (JSON lines with request ids)
    lmaas undeploy tiny-lm

Every model lives in one Serve application (`lmaas`, route `/`); the same app runs from
`serve deploy deployments/serve.yaml`, which holds every scaling knob.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import typer
from rich.console import Console
from rich.table import Table

from lmaas.cli import remote
from lmaas.config import load_settings
from lmaas.errors import ConfigError, InvalidInputError

console = Console(highlight=False)


def _connect():  # noqa: ANN202 - Settings
    from lmaas import cluster

    settings = load_settings()
    if not settings.ray_address:
        raise ConfigError(
            "deployments need a running Ray cluster that outlives this command: run `ray start --head` "
            "and set RAY_ADDRESS=auto (or the head's address)",
            param="RAY_ADDRESS",
        )
    cluster.connect(settings)
    # Serve's handles log at INFO on the driver; keep the console to our one line per outcome
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    return settings


def deploy(
    ref: str = typer.Argument(..., help="Registry reference: name, name:3 or name@alias."),
    name: str = typer.Option(None, "--name", help="The `model` clients send (default: the reference's name)."),
    min_replicas: int = typer.Option(1, "--min-replicas", help="0 scales to zero when idle."),
    max_replicas: int = typer.Option(None, "--max-replicas", help="Default: max(min-replicas, 1)."),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPUs per replica (fractions allowed)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per replica."),
    multiplexed: bool = typer.Option(False, "--multiplexed", help="Host on the shared multiplexed deployment (long-tail models)."),
    colocated: bool = typer.Option(
        False, "--colocated", help="Run the engine inside the gateway's replicas (no hop between engine and HTTP; one such model per app)."
    ),
    port: int = typer.Option(8000, "--port", help="HTTP port of Serve's proxy (when Serve is not running yet)."),
    grpc_port: int = typer.Option(
        9000, "--grpc-port", help="gRPC port of Serve's proxy (lmaas.v1.Inference; 0: no gRPC), when Serve is not running yet."
    ),
    canary: str = typer.Option(None, "--canary", help="A canary reference (e.g. name:7) that takes --weight percent of the traffic."),
    weight: int = typer.Option(10, "--weight", help="The canary's share of requests in percent (0-100)."),
    sticky: bool = typer.Option(False, "--sticky", help="Keep each user (request `user`, X-Lmaas-User, else API key) on one side."),
    promote_after: str = typer.Option(None, "--promote-after", help="Promote the canary when healthy this long (10m, 1h); default: never."),
    max_error_rate: float = typer.Option(0.05, "--max-error-rate", help="Roll back above this canary server-error rate."),
    max_latency_ratio: float = typer.Option(2.0, "--max-latency-ratio", help="Roll back when canary p99 latency exceeds this x stable's."),
    engine: str = typer.Option(
        "auto", "--engine", help="Causal LMs: vllm, lmaas (lmaas's torch engine) or auto (vllm where installed and able to load the model)."
    ),
    max_adapters: int = typer.Option(
        0, "--max-adapters", help="Also serve this model's LoRA adapters by name, this many loaded per replica at once (LRU)."
    ),
) -> None:
    """Serve a registered model behind the OpenAI API (autoscaled; aliases roll over in place), optionally with a canary."""
    from pydantic import ValidationError

    from lmaas.auth import parse_duration
    from lmaas.registry import ModelRegistry
    from lmaas.serve.deployments import deploy_model, http_port
    from lmaas.serve.options import ServedModel

    settings = load_settings()
    registry = ModelRegistry.from_settings(settings)
    # an unknown reference or a bad signature fails here, not in a replica
    registry.check_signature(registry.resolve(ref))
    canary_options = None
    if canary is not None:
        registry.check_signature(registry.resolve(canary))
        canary_options = {
            "ref": canary, "weight": weight, "sticky": sticky, "max_error_rate": max_error_rate, "max_latency_ratio": max_latency_ratio,
            "promote_after_s": parse_duration(promote_after, param="--promote-after") if promote_after else None,
            "num_cpus": num_cpus, "num_gpus": num_gpus,
        }
    try:
        served = ServedModel(
            ref=ref,
            name=name,
            min_replicas=min_replicas,
            max_replicas=max(min_replicas, 1) if max_replicas is None else max_replicas,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            multiplexed=multiplexed,
            colocated=colocated,
            canary=canary_options,
            engine={"engine": engine, "device": "cuda" if num_gpus > 0 else "cpu", "max_adapters": max_adapters},
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInputError(f"{'.'.join(map(str, first['loc'])) or 'deploy'}: {first['msg']}") from None
    settings = _connect()
    _bootstrap_admin_key(settings)
    with console.status(f"deploying {served.name} ({ref}) ..."):
        version = deploy_model(served, env=settings.worker_env(), port=port, grpc_port=grpc_port or None)
    port = http_port()  # Serve may have been running already, on its own port
    console.print(f"deployed [bold]{served.name}[/] serving {version}; try (a key from `lmaas keys create --scope inference`):")
    if served.canary is not None:
        console.print(f"canary {served.canary.ref} takes {served.canary.weight}% of {served.name}'s requests; `lmaas deployments` shows its state")
    console.print(
        f"  curl http://127.0.0.1:{port}/v1/completions -H 'Content-Type: application/json' -H \"Authorization: Bearer $LMAAS_API_KEY\" "
        f"-d '{{\"model\": \"{served.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
        soft_wrap=True,
    )
    if grpc_port:
        console.print(
            f"  grpcurl -plaintext -H \"authorization: Bearer $LMAAS_API_KEY\" -d '{{\"model\": \"{served.name}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}' "
            f"127.0.0.1:{grpc_port} lmaas.v1.Inference/Complete",
            soft_wrap=True,
        )


def _bootstrap_admin_key(settings) -> None:  # noqa: ANN001 - Settings
    """The gateway requires API keys: make sure an admin one exists, and show it here, once, if it is new."""
    import os

    from lmaas import db
    from lmaas.auth import ADMIN_KEY_ENV, KeyStore

    secret = KeyStore(db.connect(settings.database_url)).bootstrap(secret=os.environ.get(ADMIN_KEY_ENV) or None, actor="cli")
    if secret:
        console.print(f"created tenant default and its admin API key (shown once, keep it): {secret}", soft_wrap=True)


def undeploy(name: str = typer.Argument(..., help="The deployment's name (see `lmaas deployments`).")) -> None:
    """Stop serving a model (in-flight streams finish first)."""
    from lmaas.serve.deployments import undeploy_model

    _connect()
    with console.status(f"undeploying {name} ..."):
        undeploy_model(name)
    console.print(f"undeployed {name}")


def deployments() -> None:
    """List served models with their versions, replica counts and status (of the gateway at LMAAS_URL, when set)."""
    if remote.gateway_url():
        rows = [SimpleNamespace(**d) for d in remote.get("/api/v1/deployments")["data"]]
    else:
        from lmaas.serve.deployments import list_deployments

        _connect()
        rows = list_deployments()
    if not rows:
        console.print("nothing deployed; `lmaas deploy REF` serves a registered model")
        return
    table = Table("name", "ref", "serving", "engine", "status", "replicas", "min..max", "multiplexed", "canary")
    for r in rows:
        canary = f"{r.canary['ref']} {r.canary['weight']}% {r.canary['state']}" if r.canary else ""
        table.add_row(r.name, r.ref, r.serving, r.engine, r.status, str(r.running), f"{r.min_replicas}..{r.max_replicas}", "yes" if r.multiplexed else "", canary)
    console.print(table)


def logs(
    name: str = typer.Argument(..., help="Served model name (as `lmaas deployments` lists it) or a Serve deployment name."),
    tail: int = typer.Option(100, "--tail", "-n", min=1, help="Lines per replica."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until interrupted."),
    app_name: str = typer.Option("lmaas", "--app", help="Serve application."),
) -> None:
    """Print the replica logs of a deployment: JSON lines with the request id the gateway returned in X-Request-Id."""
    from lmaas.ops.logs import follow_replica_logs, replica_actors, replica_logs
    from lmaas.serve.options import canary_deployment_name, deployment_name

    _connect()
    # a served name's stable side runs in model-<name>, or after a canary promotion in model-<name>-canary
    deployment = next((d for d in (name, deployment_name(name), canary_deployment_name(name)) if replica_actors(d, app_name)), None)
    if deployment is None:
        raise InvalidInputError(f"no running replica of {name!r} in app {app_name!r}; see `lmaas deployments`", param="name")
    if follow:
        for line in follow_replica_logs(deployment, app_name, tail=tail):
            print(line, flush=True)
        return
    for replica, lines in replica_logs(deployment, app_name, tail=tail).items():
        print(f"==> {replica} <==")
        for line in lines:
            print(line)
