"""`lmaas status`: is everything lmaas needs reachable?"""

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
    if as_json:
        print(
            json.dumps(
                {
                    "version": lmaas.__version__,
                    "home": str(settings.home),
                    "ok": not failed,
                    "components": [c.__dict__ for c in checks],
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
    for c in failed:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {c.detail}")
    if failed:
        sys.exit(1)
