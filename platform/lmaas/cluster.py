"""The Ray connection: join `RAY_ADDRESS` or start a local cluster sized for a small machine.

Every driver (CLI command, job entrypoint, test) calls `connect(settings)` once. Workers get the
same lmaas settings through the runtime environment, and when the cluster is remote (a
`ray://` client address or another host) the `lmaas` package itself is shipped to them, so a
laptop can drive a cluster whose nodes only have Ray installed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmaas.config import Settings
from lmaas.errors import ConfigError, UnreachableError

_QUIET_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DEDUP_LOGS": "1"}


@dataclass(frozen=True)
class ClusterInfo:
    """What `connect` joined or started."""

    address: str
    started_here: bool
    dashboard_url: str | None
    nodes: int
    resources: dict[str, float]

    @property
    def cpus(self) -> float:
        return self.resources.get("CPU", 0.0)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)


def resolve_address(address: str) -> str:
    """Turn `auto` into the address of the cluster running on this machine.

    Raises:
        UnreachableError: `auto` but no cluster runs here.
    """
    if address != "auto":
        return address
    import ray._private.services as services

    found = services.find_bootstrap_address(None)
    if not found:
        raise UnreachableError("RAY_ADDRESS=auto but no Ray cluster runs on this machine; start one with `ray start --head`")
    return found


def probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast when nothing listens at a Ray address (ray.init would wait minutes).

    Raises:
        ConfigError: the address is malformed.
        UnreachableError: nothing accepts a TCP connection there.
    """
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"RAY_ADDRESS={address!r} is not host:port, ray://host:port or auto", param="ray_address")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise UnreachableError(f"Ray cluster at {address} is unreachable: {exc.strerror or exc}") from None


def is_remote(address: str) -> bool:
    """True for a Ray Client address or a cluster on another host (the package must be shipped)."""
    if address.startswith("ray://"):
        return True
    host = address.rpartition(":")[0] or address
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return True
    local = {"127.0.0.1", "0.0.0.0"}
    try:
        local.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    import ray._private.services as services

    local.add(services.get_node_ip_address())
    return ip not in local and not ip.startswith("127.")


def runtime_env(settings: Settings, *, ship_package: bool) -> dict[str, Any]:
    """The runtime environment every lmaas job and replica runs with."""
    env: dict[str, Any] = {"env_vars": {**settings.worker_env(), **_QUIET_ENV}}
    if ship_package:
        import lmaas

        env["py_modules"] = [str(Path(lmaas.__file__).parent)]
    return env


def _without_job_fields(env: dict[str, Any]) -> dict[str, Any]:
    """Inside a `ray job submit` driver, drop what the job's own runtime env already sets.

    Ray refuses to merge a driver's runtime env with the job's when a field or an env var key
    appears in both; the job's values (set by the user at submission) win.
    """
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return env
    job_env = (json.loads(injected).get("runtime_env") or {})
    job_vars = job_env.get("env_vars") or {}
    merged = {k: v for k, v in env.items() if k != "env_vars" and k not in job_env}
    env_vars = {k: v for k, v in env.get("env_vars", {}).items() if k not in job_vars}
    if env_vars:
        merged["env_vars"] = env_vars
    return merged


def connect(
    settings: Settings,
    *,
    num_cpus: float | None = None,
    dashboard: bool = False,
    quiet: bool = True,
) -> ClusterInfo:
    """Join the configured Ray cluster, or start a local one; reuse the connection if one exists.

    Args:
        settings: where to connect (`settings.ray_address`; None starts a local cluster).
        num_cpus: CPUs for a local cluster (default: all of this machine's).
        dashboard: start the Ray dashboard with a local cluster.
        quiet: keep worker logs and Ray's own chatter off the console.

    Raises:
        UnreachableError: `RAY_ADDRESS` names a cluster that does not answer.
        ConfigError: `RAY_ADDRESS` is malformed.
    """
    import ray

    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    if quiet:
        # Ray 2.60 warns on every new local cluster that token auth is on; that is the default we want.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _raylet_messages_to_stderr()
    if ray.is_initialized():
        return _info(started_here=False)
    common: dict[str, Any] = {
        "log_to_driver": not quiet,
        "logging_level": "warning" if quiet else "info",
        "namespace": "lmaas",
        "configure_logging": True,
    }
    if settings.ray_address:
        address = resolve_address(settings.ray_address)
        probe(address)
        ship = os.environ.get("LMAAS_SHIP_PACKAGE", "auto")
        ship_package = ship == "always" or (ship == "auto" and is_remote(address))
        env = _without_job_fields(runtime_env(settings, ship_package=ship_package))
        try:
            ray.init(address=address, runtime_env=env, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UnreachableError(f"cannot join Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return _info(started_here=False)
    ray.init(
        address="local",
        num_cpus=num_cpus if num_cpus is not None else os.cpu_count(),
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env(settings, ship_package=False),
        **common,
    )
    return _info(started_here=True)


def _raylet_messages_to_stderr() -> None:
    """Print the raylet's warnings (worker pool, OOM kills) on stderr, not stdout.

    Ray's driver prints them on stdout, where they would corrupt a command's output (`--json`).
    """
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "_lmaas", False):
        return

    def print_to_stdstream(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            data = {**data, "is_err": True}
        original(data, ignore_prefix)

    print_to_stdstream._lmaas = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = print_to_stdstream


def _info(*, started_here: bool) -> ClusterInfo:
    import ray
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    return ClusterInfo(
        address=str(ray.get_runtime_context().gcs_address),
        started_here=started_here,
        dashboard_url=(url if "://" in url else f"http://{url}") if url else None,
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        resources={k: float(v) for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
    )


def disconnect() -> None:
    """Leave the cluster (and stop it, if this process started it)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
