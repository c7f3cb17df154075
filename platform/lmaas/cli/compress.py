"""`lmaas compress`: quantize, prune, export or distill a registered model into a measured, gated child version.

    lmaas compress tiny-lm --method int8-dynamic
    lmaas compress tiny-lm:3 --method prune --set sparsity=0.5 --set recovery_steps=100
    lmaas compress tiny-lm --config jobs/configs/compress_int8.yaml --set gate.min_agreement=0.95
    lmaas compress tiny-lm --method distill --set student=tiny --set student_overrides.num_hidden_layers=1
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from lmaas import cluster
from lmaas.config import load_config, load_settings


def compress(
    ref: str = typer.Argument(..., help="Parent: name, name:VERSION or name@ALIAS of a causal LM."),
    method: str = typer.Option(None, "--method", help="int8-dynamic, int8-weight, int4-weight, prune, export or distill."),
    config: str = typer.Option(None, "--config", help="CompressConfig (DistillConfig for distill) YAML; REF, --method and --set override it."),
    overrides: list[str] = typer.Option([], "--set", help="key=value override of any CompressConfig (DistillConfig) field."),
    resume: str = typer.Option(None, "--resume", help="distill: continue run RUN_ID from its latest checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compress REF with one method; register the variant (archived if it misses the gate) with its report.

    `distill` trains a smaller student on the Ray cluster (RAY_ADDRESS, or a local one).
    """
    from lmaas.compress import CompressConfig, DistillConfig, check_request
    from lmaas.compress import compress as run_compress
    from lmaas.registry import ModelRegistry

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress line of our own, not one bar per weights file
    distill = (method or _method_in(config)) == "distill"
    if resume and not distill:
        from lmaas.errors import ConfigError

        raise ConfigError("--resume continues a distill run; the other methods have no checkpoints", param="resume")
    items = [f"{'teacher' if distill else 'ref'}={ref}", *([f"method={method}"] if method else []), *overrides]
    cfg = load_config(DistillConfig if distill else CompressConfig, config, items)
    settings = load_settings()
    registry = ModelRegistry.from_settings(settings)
    check_request(cfg, registry)
    console = Console(stderr=True, highlight=False)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"{cfg.method} of {ref}", total=None)
        say = lambda line: bar.update(task, description=line)  # noqa: E731
        if distill:
            from lmaas.compress.distill import distill as run_distill
            from lmaas.data.ingest import quiet_ray_data_logs

            say("starting Ray")
            cluster.connect(settings)
            quiet_ray_data_logs()
            result = run_distill(cfg, registry, resume=resume, progress=say)
        else:
            result = run_compress(cfg, registry, progress=say)
    if as_json:
        print(json.dumps({"ref": result.version.ref, "status": result.version.status, **result.report}, indent=1))
        return
    out = Console(highlight=False)
    verdict = "[green]passed[/]" if result.passed else f"[red]gate failed ({'; '.join(result.reasons)}), archived[/]"
    out.print(f"registered {result.version.ref} from {result.version.parent}: {verdict}")
    out.print(report_table(result.report))


def _method_in(path: str | None) -> str | None:
    """The `method:` a config file names, if any (it picks the config class)."""
    if not path:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(open(path).read())  # noqa: SIM115 - load_config reports unreadable files
    except (OSError, yaml.YAMLError):
        return None
    return loaded.get("method") if isinstance(loaded, dict) else None


def report_table(report: dict) -> Table:
    """The report as a parent-vs-variant table (also used by `lmaas models show`)."""
    table = Table(title=f"{report['method']} vs {report['parent_ref']}", caption=f"held-out data: {report['data']['source']}",
                  title_justify="left", caption_justify="left")
    for column in ("", "parent", "variant", "ratio"):
        table.add_column(column, justify="right")
    p, v, r = report["parent"], report["variant"], report["ratios"]
    rows = [
        ("weights", f"{p['size_bytes'] / 1e6:.2f} MB", f"{v['size_bytes'] / 1e6:.2f} MB", f"{r['size_ratio']:.2f}x"),
        ("parameters", f"{p['parameters']:,}", f"{v['parameters']:,}", ""),
        ("sparsity", f"{p['sparsity']:.1%}", f"{v['sparsity']:.1%}", ""),
        ("perplexity", f"{p['perplexity']:.3f}", f"{v['perplexity']:.3f}", f"{r['perplexity_increase']:+.2%}"),
        ("greedy agreement", "", f"{v['agreement']:.1%}", ""),
        ("latency ms/token", f"{p['latency_ms_per_token']:.2f}", f"{v['latency_ms_per_token']:.2f}", f"{r['decode_speedup']:.2f}x speed"),
        ("batched tokens/s", f"{p['batch_tokens_per_s']:.0f}", f"{v['batch_tokens_per_s']:.0f}", f"{r['throughput_ratio']:.2f}x"),
    ]
    for row in rows:
        table.add_row(*row)
    return table
