"""`lmaas models ...`: the model registry from the command line.

    lmaas models import ./my-model --name minilm --task embedding
    lmaas models list
    lmaas models versions minilm
    lmaas models alias minilm production 1
    lmaas models export minilm@production ./out
    lmaas models lineage minilm:1
    lmaas models gc --older-than 0
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import typer
from rich.console import Console
from rich.table import Table

from lmaas.cli import remote
from lmaas.config import load_settings
from lmaas.errors import InvalidInputError

app = typer.Typer(help="Registered models: versions, aliases, lineage, import/export.", no_args_is_help=True)
console = Console(highlight=False)


def _registry():
    from lmaas.registry import ModelRegistry

    return ModelRegistry.from_settings(load_settings())


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=1))


@app.command("list")
def list_models(
    search: str = typer.Option(None, "--search", help="Only names containing this text."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List registered models (of the gateway at LMAAS_URL, when set)."""
    if remote.gateway_url():
        params = {"search": search} if search else None
        models = [SimpleNamespace(**m) for m in remote.get("/api/v1/models", params)["data"]]
    else:
        models = _registry().list_models(search=search)
    if as_json:
        return _print_json([vars(m) if isinstance(m, SimpleNamespace) else m.to_dict() for m in models])
    table = Table(title="models", title_justify="left")
    for column in ("name", "latest", "tenant", "created", "description"):
        table.add_column(column)
    for m in models:
        table.add_row(m.name, str(m.latest_version), m.tenant, _when(m.created_at), m.description)
    console.print(table)


@app.command()
def show(ref: str = typer.Argument(..., help="name, name:VERSION or name@ALIAS"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one version (a bare name shows what it resolves to) with its files and aliases (of the gateway at LMAAS_URL, when set)."""
    if remote.gateway_url():
        return _show_remote(ref, as_json)
    registry = _registry()
    version = registry.resolve(ref)
    aliases = [a.alias for a in registry.aliases(version.name) if a.version == version.version]
    if as_json:
        return _print_json({**version.to_dict(), "aliases": aliases})
    table = Table(title=f"{version.ref}  ({version.task}, {version.status})", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for field, value in [
        ("size", _size(version.size)),
        ("created", _when(version.created_at)),
        ("aliases", ", ".join(aliases) or "-"),
        ("parents" if len(version.parents) > 1 else "parent", ", ".join(version.parents) or "-"),
        ("dataset", version.dataset or "-"),
        ("run", version.run or "-"),
        ("metrics", json.dumps(version.metrics) if version.metrics else "-"),
        ("signed", "yes" if version.signature else "no"),
        ("store", registry.storage.url(version.prefix)),
    ]:
        table.add_row(field, value)
    for f in version.files:
        table.add_row(f"  {f.path}", f"{_size(f.size)}  sha256 {f.sha256}")
    console.print(table)
    if any(f.path == "report.json" for f in version.files):  # a compressed variant: its report against the parent
        from lmaas.cli.compress import report_table

        console.print(report_table(json.loads(registry.read_file(version.ref, "report.json")[1])))


def _show_remote(ref: str, as_json: bool) -> None:
    version = remote.get("/api/v1/resolve", {"ref": ref})
    if as_json:
        return _print_json(version)
    table = Table(title=f"{version['ref']}  ({version['task']}, {version['status']})", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for field, value in [
        ("size", _size(version["size"])),
        ("created", _when(version["created_at"])),
        ("tenant", version["tenant"]),
        ("parents", ", ".join(version.get("parents") or ([version["parent"]] if version["parent"] else [])) or "-"),
        ("dataset", version["dataset"] or "-"),
        ("run", version["run"] or "-"),
        ("metrics", json.dumps(version["metrics"]) if version["metrics"] else "-"),
        ("signed", "yes" if version["signed"] else "no"),
    ]:
        table.add_row(field, value)
    for f in version["files"]:
        table.add_row(f"  {f['path']}", f"{_size(f['size'])}  sha256 {f['sha256']}")
    console.print(table)


@app.command()
def versions(
    name: str,
    offset: int = typer.Option(0, "--offset"),
    limit: int = typer.Option(50, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List a model's versions, newest first."""
    registry = _registry()
    found = registry.list_versions(name, offset=offset, limit=limit)
    aliases: dict[int, list[str]] = {}
    for a in registry.aliases(name):
        aliases.setdefault(a.version, []).append(a.alias)
    if as_json:
        return _print_json([{**v.to_dict(), "aliases": aliases.get(v.version, [])} for v in found])
    table = Table(title=f"{name}: versions", title_justify="left")
    for column in ("version", "status", "task", "size", "aliases", "parent", "dataset", "created"):
        table.add_column(column)
    for v in found:
        table.add_row(
            str(v.version), v.status, v.task, _size(v.size), ", ".join(aliases.get(v.version, [])), v.parent or "",
            v.dataset or "", _when(v.created_at),
        )
    console.print(table)


@app.command()
def alias(
    name: str,
    alias_name: str = typer.Argument(..., metavar="ALIAS"),
    version: int = typer.Argument(None, help="Version to point at; omit with --delete."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias."),
) -> None:
    """Point an alias (production, staging, canary...) at a version, or delete it."""
    registry = _registry()
    if delete:
        registry.delete_alias(name, alias_name)
        console.print(f"deleted {name}@{alias_name}")
        return
    if version is None:
        raise InvalidInputError("give a VERSION to point the alias at, or --delete", param="version")
    registry.set_alias(name, alias_name, version)
    console.print(f"{name}@{alias_name} -> {name}:{version}")


@app.command("import")
def import_model(
    directory: Path = typer.Argument(..., help="A local HF-format model directory (safetensors weights)."),
    name: str = typer.Option(..., "--name", help="Model name to register under."),
    task: str = typer.Option("causal-lm", "--task", help="causal-lm, embedding, ..."),
    dataset: str = typer.Option(None, "--dataset", help="Dataset version it was trained on (name:version)."),
    parent: str = typer.Option(None, "--parent", help="Reference of the version it derives from."),
    run: str = typer.Option(None, "--run"),
    description: str = typer.Option("", "--description"),
) -> None:
    """Register a local model directory as the next version of NAME."""
    version = _registry().register_version(
        name, directory, task=task, dataset=dataset, parent=parent, run=run, description=description
    )
    console.print(f"registered {version.ref} ({len(version.files)} files, {_size(version.size)})")


@app.command()
def export(ref: str, directory: Path) -> None:
    """Download a version into DIRECTORY (verifying every file), loadable by transformers."""
    version = _registry().download(ref, directory)
    console.print(f"exported {version.ref} to {directory}")


@app.command()
def archive(ref: str, restore: bool = typer.Option(False, "--restore", help="Make an archived version ready again.")) -> None:
    """Archive a version (kept, but no longer what a bare name resolves to), or restore it."""
    registry = _registry()
    version = registry.restore(ref) if restore else registry.archive(ref)
    console.print(f"{version.ref} is {version.status}")


@app.command()
def delete(ref: str = typer.Argument(..., help="name:VERSION to delete")) -> None:
    """Delete a version and its files (refused while an alias or deployment points at it)."""
    from lmaas.registry.refs import parse_ref

    if parse_ref(ref).version is None:
        raise InvalidInputError(f"delete takes an exact version, name:VERSION, not {ref!r}", param="ref")
    version = _registry().delete_version(ref)
    console.print(f"deleted {version.ref}")


@app.command()
def lineage(
    ref: str = typer.Argument(None, help="A model reference."),
    dataset: str = typer.Option(None, "--dataset", help="Instead: every version trained on this dataset."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Where a version came from (dataset, run, parent) and what came of it (children, aliases, deployments)."""
    registry = _registry()
    if dataset:
        found = registry.trained_on(dataset)
        if as_json:
            return _print_json([v.ref for v in found])
        table = Table(title=f"trained on {dataset}", title_justify="left")
        for column in ("version", "task", "run", "created"):
            table.add_column(column)
        for v in found:
            table.add_row(v.ref, v.task, v.run or "", _when(v.created_at))
        console.print(table)
        return
    if not ref:
        raise InvalidInputError("give a model reference or --dataset", param="ref")
    info = registry.lineage(ref).to_dict()
    if as_json:
        return _print_json(info)
    table = Table(title=f"lineage of {info['ref']}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key in ("dataset", "run", "parents", "children", "aliases", "deployments"):
        value = info[key]
        table.add_row(key, ", ".join(value) if isinstance(value, list) else (value or "-"))
    console.print(table)


@app.command()
def gc(
    older_than: float = typer.Option(3600, "--older-than", help="Grace period in seconds for uploads in progress."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be deleted."),
) -> None:
    """Delete files that no version references (killed uploads, deleted versions)."""
    removed = _registry().gc(grace_seconds=older_than, dry_run=dry_run)
    for path in removed:
        console.print(("would delete " if dry_run else "deleted ") + path)
    console.print(f"{len(removed)} leftover(s) {'found' if dry_run else 'removed'}")


@app.command("serve-api")
def serve_api(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port"),
    no_auth: bool = typer.Option(False, "--no-auth", help="No API keys: every caller is an admin (a trusted network only)."),
) -> None:
    """Run the management REST API (/api/v1/models, keys, usage, audit..., /openapi.json) standalone with uvicorn.

    Every route but /healthz needs `Authorization: Bearer <key>`; on first start an admin key is
    created and printed once (or taken from LMAAS_ADMIN_KEY). `--no-auth` opens it to every caller.
    """
    import uvicorn

    from lmaas.auth import AuthConfig
    from lmaas.serve.auth import build_auth
    from lmaas.serve.management import build_app

    registry = _registry()
    auth = build_auth(AuthConfig(enabled=not no_auth), load_settings())
    uvicorn.run(build_app(registry, auth=auth), host=host, port=port, log_level="warning")


@app.command()
def merge(
    refs: list[str] = typer.Argument(None, help="Models to merge, in order (name, name:VERSION or name@ALIAS); the first gives "
                                                "the merge its config and tokenizer."),
    method: str = typer.Option(None, "--method", help="linear (default), slerp, task_arithmetic, ties, dare_linear or dare_ties."),
    weights: str = typer.Option(None, "--weights", help="Comma-separated, one per model (linear: normalized to sum 1)."),
    base: str = typer.Option(None, "--base", help="task_arithmetic, ties, dare_*: the model the others were fine-tuned from."),
    density: float = typer.Option(None, "--density", help="ties, dare_*: share of each task vector kept."),
    t: float = typer.Option(None, "--t", help="slerp: 0 gives the first model, 1 the second."),
    seed: int = typer.Option(None, "--seed", help="dare_*: seed of the random drop."),
    output: str = typer.Option(None, "--output", help="Registry name of the merge (default <first name>-<method>)."),
    alias_name: str = typer.Option(None, "--alias", help="Alias to point at the merged version."),
    config: str = typer.Option(None, "--config", help="MergeConfig YAML (jobs/configs/merge_*.yaml); arguments and --set override it."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any MergeConfig field."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Merge the weights of registered causal LMs into a new version, measured against every parent.

        lmaas models merge code-a code-b --weights 0.5,0.5 --output code-soup
        lmaas models merge code-a code-b --method ties --base tiny-lm:1 --density 0.5 --output code-ties
    """
    from lmaas.compress.merge import MergeConfig, check_merge
    from lmaas.compress.merge import merge as run_merge
    from lmaas.config import load_config

    given = {"models": refs or None, "method": method, "base": base, "density": density, "t": t, "seed": seed,
             "output_model": output, "alias": alias_name}
    # each value as JSON, which load_config reads as YAML: a reference such as 1:30 stays a string
    items = [f"{key}={json.dumps(value)}" for key, value in given.items() if value is not None]
    if weights:
        items.append(f"weights=[{weights}]")
    cfg = load_config(MergeConfig, config, [*items, *overrides])
    registry = _registry()
    check_merge(cfg, registry)
    result = _with_progress(f"{cfg.method} merge", lambda say: run_merge(cfg, registry, progress=say))
    _print_merge(result, as_json)


@app.command("merge-adapter")
def merge_adapter(
    ref: str = typer.Argument(..., help="The LoRA adapter version (task adapter); its parent is the base it merges into."),
    output: str = typer.Option(None, "--output", help="Registry name of the merged model (default <adapter name>-merged)."),
    alias_name: str = typer.Option(None, "--alias", help="Alias to point at the merged version."),
    tolerance: float = typer.Option(1e-3, "--tolerance", help="Largest |logit difference| from base + adapter accepted."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Merge a LoRA adapter into its base model (PEFT merge_and_unload): a standalone causal LM version.

        lmaas models merge-adapter my-lora:2 --output my-model
    """
    from lmaas.compress.merge import check_adapter_merge
    from lmaas.compress.merge import merge_adapter as run_merge_adapter

    registry = _registry()
    check_adapter_merge(ref, output, registry)
    result = _with_progress(f"merging {ref}", lambda say: run_merge_adapter(ref, output, registry, alias=alias_name,
                                                                            tolerance=tolerance, progress=say))
    _print_merge(result, as_json)


def _with_progress(title: str, work):
    """`work(say)`'s result, run under one spinner line on stderr that each `say(line)` updates."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress line of our own, not one bar per weights file
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=Console(stderr=True, highlight=False),
                  transient=True) as bar:
        task = bar.add_task(title, total=None)
        return work(lambda line: bar.update(task, description=line))


def _print_merge(result, as_json: bool) -> None:
    """Print a `MergeResult`: the merged version and its held-out loss against every parent, a row per evaluation set."""
    report = result.report
    if as_json:
        return _print_json({"ref": result.version.ref, **report})
    console.print(f"registered {result.version.ref} from {', '.join(report['parents'])} ({report['method']})")
    parents = list(report["eval"][0]["parents"])
    table = Table(title="held-out loss", title_justify="left")
    for column in ("data", "merged", *parents, "merged - best parent"):
        table.add_column(column, justify="right")
    for row in report["eval"]:
        table.add_row(row["data"], f"{row['merged']['loss']:.4f}", *(f"{row['parents'][p]['loss']:.4f}" for p in parents),
                      f"{row['merged']['loss_vs_best_parent']:+.4f}")
    console.print(table)
    if "max_abs_logit_diff" in report:
        console.print(f"max |logit diff| vs base + adapter: {report['max_abs_logit_diff']:.2e}")
