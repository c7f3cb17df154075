"""`lmaas status`: is everything lmaas needs reachable, and what runs on the cluster?

    lmaas status                      # settings, storage, database, Ray
    RAY_ADDRESS=auto lmaas status     # plus nodes and resources, deployments with replicas and recent error rate,
                                      # queued and running jobs
    lmaas status --json
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

import lmaas
from lmaas.config import load_settings
from lmaas.ops import health


def status(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """Show the settings in force and check the artifact store, the database and the Ray cluster."""
    settings = load_settings()
    checks = [health.check_storage(settings), health.check_database(settings), health.check_ray(settings)]
    failed = [c for c in checks if not c.ok]
    overview = _overview(settings, database_ok=checks[1].ok, ray_ok=checks[2].ok)
    if as_json:
        print(
            json.dumps(
                {
                    "version": lmaas.__version__,
                    "home": str(settings.home),
                    "ok": not failed,
                    "components": [c.__dict__ for c in checks],
                    **overview,
                },
                indent=1,
            )
        )
    else:
        console = Console(highlight=False)
        table = Table(title=f"lmaas {lmaas.__version__}  (home {settings.home})", title_justify="left")
        for column in ("component", "where", "state", "detail"):
            table.add_column(column, overflow="fold")
        for c in checks:
            table.add_row(c.name, c.target, "[green]ok[/]" if c.ok else "[red]failed[/]", c.detail)
        console.print(table)
        _print_overview(console, overview)
    for c in failed:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {c.detail}")
    if failed:
        sys.exit(1)


def _overview(settings, *, database_ok: bool, ray_ok: bool) -> dict:  # noqa: ANN001 - Settings
    """Jobs from the queue (when the database answers); nodes and deployments when a cluster is named and reachable."""
    out: dict = {}
    if database_ok:
        from lmaas import db
        from lmaas.ops import queue

        jobs = queue.list_jobs(db.connect(settings.database_url), states=("queued", *queue.ACTIVE))
        out["jobs"] = [{"id": j.id, "tenant": j.tenant, "kind": j.kind, "priority": j.priority_name, "state": j.state,
                        "resources": j.resources, "created_at": j.created_at} for j in jobs]
    if not (settings.ray_address and ray_ok):
        return out
    import logging

    import ray

    from lmaas import cluster
    from lmaas.ops.metrics import recent_traffic

    cluster.connect(settings)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        available = ray.available_resources()
        out["nodes"] = [
            {"node_id": n["NodeID"], "address": n["NodeManagerAddress"], "alive": n["Alive"], "head": "node:__internal_head__" in n["Resources"],
             "cpus": n["Resources"].get("CPU", 0.0), "gpus": n["Resources"].get("GPU", 0.0),
             "memory_gib": round(n["Resources"].get("memory", 0.0) / 2**30, 1)}
            for n in ray.nodes()
        ]
        # the gateway replicas' last-5-minutes gauges, scraped from every node's metrics export port
        out["traffic"] = recent_traffic([(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes()
                                         if n["Alive"] and n.get("MetricsExportPort")])
        out["resources"] = {"total": {k: ray.cluster_resources().get(k, 0.0) for k in ("CPU", "GPU")},
                            "available": {k: available.get(k, 0.0) for k in ("CPU", "GPU")}}
        serving = any(a["name"] == "SERVE_CONTROLLER_ACTOR" for a in ray.util.list_named_actors(all_namespaces=True))
        if serving:
            from lmaas.serve.deployments import list_deployments

            out["deployments"] = [_with_traffic(d.__dict__, out["traffic"]) for d in list_deployments()]
        else:
            out["deployments"] = []
    finally:
        cluster.disconnect()
    return out


def _with_traffic(deployment: dict, traffic: dict) -> dict:
    """The deployment plus its recent requests and 5xx answers (clients name it by its served name or its reference)."""
    names = {deployment["name"], deployment["ref"]}
    requests = sum(traffic.get(n, {}).get("requests", 0) for n in names)
    errors = sum(traffic.get(n, {}).get("errors", 0) for n in names)
    return {**deployment, "recent_requests": requests, "recent_errors": errors, "error_rate": errors / requests if requests else None}


def _rate(errors: float, requests: float) -> str:
    return f"{errors / requests:.1%} of {requests:g}" if requests else "no requests"


def _print_overview(console: Console, overview: dict) -> None:
    if "nodes" in overview:
        table = Table("node", "address", "state", "CPU", "GPU", "memory", title="nodes", title_justify="left")
        for n in overview["nodes"]:
            table.add_row(n["node_id"][:12] + (" (head)" if n["head"] else ""), n["address"], "[green]alive[/]" if n["alive"] else "[red]dead[/]",
                          f"{n['cpus']:g}", f"{n['gpus']:g}", f"{n['memory_gib']:g} GiB")
        console.print(table)
        free, total = overview["resources"]["available"], overview["resources"]["total"]
        console.print(f"free: {free['CPU']:g}/{total['CPU']:g} CPU, {free['GPU']:g}/{total['GPU']:g} GPU")
    if overview.get("deployments"):
        table = Table("deployment", "serving", "status", "replicas", "min..max", "5xx (last 5 min)", title="deployments", title_justify="left")
        for d in overview["deployments"]:
            table.add_row(d["name"], d["serving"], d["status"], str(d["running"]), f"{d['min_replicas']}..{d['max_replicas']}",
                          _rate(d["recent_errors"], d["recent_requests"]))
        console.print(table)
    elif "deployments" in overview:
        console.print("deployments: none (`lmaas deploy REF`)")
    if overview.get("traffic"):
        table = Table("model", "requests", "5xx", "error rate", title="gateway traffic, last 5 minutes", title_justify="left")
        for model, t in sorted(overview["traffic"].items()):
            table.add_row(model, f"{t['requests']:g}", f"{t['errors']:g}", f"{t['error_rate']:.1%}")
        console.print(table)
    if overview.get("jobs"):
        table = Table("job", "tenant", "kind", "priority", "state", title="queued and running jobs", title_justify="left")
        for j in overview["jobs"]:
            table.add_row(str(j["id"]), j["tenant"], j["kind"], j["priority"], j["state"])
        console.print(table)
    elif "jobs" in overview:
        console.print("jobs: none queued or running")
