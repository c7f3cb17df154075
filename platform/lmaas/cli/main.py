"""`lmaas`: the command-line entry point.

Each command group lives in its own module and is registered here. Every user-facing failure
is a `LmaasError`, printed as one line on stderr with exit status 1; a traceback means a bug.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

import lmaas
from lmaas.cli import batch, compress, data, deploy, finetune, jobs, keys, models, quickstart, status, train
from lmaas.errors import LmaasError

app = typer.Typer(
    name="lmaas",
    help="Large models as a service on Ray: data, training, compression, registry and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@app.command()
def version() -> None:
    """Print the lmaas version."""
    print(lmaas.__version__)


app.command(name="status")(status.status)
app.command(name="quickstart")(quickstart.quickstart)
app.command(name="train")(train.train)
app.command(name="finetune")(finetune.finetune)
app.command(name="runs")(train.runs)
app.command(name="compress")(compress.compress)
app.command(name="batch")(batch.batch)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(jobs.app, name="jobs")
app.add_typer(keys.app, name="keys")
app.add_typer(keys.tenants_app, name="tenants")
app.command(name="deploy")(deploy.deploy)
app.command(name="undeploy")(deploy.undeploy)
app.command(name="deployments")(deploy.deployments)
app.command(name="logs")(deploy.logs)


def main() -> None:
    """Run the CLI; turn project errors into one line and a non-zero exit."""
    try:
        app()
    except LmaasError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", markup=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
