"""`lmaas keys ...` / `lmaas tenants ...`: API keys and tenants in the local metadata database.

    lmaas keys bootstrap                                   # tenant `default` + an admin key, if none exists
    lmaas keys create --tenant acme --scope inference --expires 30d --rpm 60 --tpm 20000
    lmaas keys list [--tenant acme]
    lmaas keys revoke 3f9a1c2b7d10
    lmaas tenants create acme --tpd 1000000
    lmaas tenants list
    lmaas tenants limits acme --rpm 600

These talk to the database of `LMAAS_DATABASE_URL` (SQLite under `LMAAS_HOME` by default), the one
the gateway reads. Against a remote gateway only, use its REST API with an admin key:
`curl -H "Authorization: Bearer $LMAAS_API_KEY" $LMAAS_URL/api/v1/keys`.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import typer
from rich.console import Console
from rich.table import Table

from lmaas.config import load_settings

app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
tenants_app = typer.Typer(help="Tenants and their rate limits.", no_args_is_help=True)
console = Console(highlight=False)
ACTOR = "cli"


def _keys():
    from lmaas import db
    from lmaas.auth import KeyStore

    return KeyStore(db.connect(load_settings().database_url))


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


@app.command("create")
def create(
    tenant: str = typer.Option("default", "--tenant", help="The owning tenant (created if missing)."),
    scope: list[str] = typer.Option(["inference"], "--scope", help="inference, models:read, models:write, deploy, admin; repeat for several."),
    name: str = typer.Option("", "--name", help="A label for people."),
    expires: str = typer.Option(None, "--expires", help="Lifetime such as 30d, 12h, 15m (default: never)."),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute (default: no limit)."),
    tpm: int = typer.Option(None, "--tpm", help="Tokens per minute."),
    tpd: int = typer.Option(None, "--tpd", help="Tokens per day."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with the secret)."),
) -> None:
    """Create an API key and print its secret: it is shown this once and stored only as a hash."""
    from lmaas.auth import Limits

    scopes = [s.strip() for item in scope for s in item.split(",") if s.strip()]
    key, secret = _keys().create_key(
        tenant, scopes, name=name, expires_in=expires, limits=Limits(rpm, tpm, tpd), actor=ACTOR, create_tenant=True
    )
    if as_json:
        print(json.dumps({**key.to_dict(), "secret": secret}, indent=1))
        return
    console.print(f"created key [bold]{key.id}[/] for tenant {key.tenant} ({', '.join(key.scopes)}); expires {_when(key.expires_at)}")
    console.print("secret (shown once; send it as `Authorization: Bearer <secret>`):")
    print(secret)


@app.command("list")
def list_keys(
    tenant: str = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List keys (never their secrets)."""
    keys = _keys().list_keys(tenant=tenant)
    if as_json:
        print(json.dumps([k.to_dict() for k in keys], indent=1))
        return
    table = Table("id", "tenant", "name", "scopes", "created", "expires", "last used", "revoked", "rpm", "tpm", "tpd")
    for k in keys:
        table.add_row(
            k.id, k.tenant, k.name, ",".join(k.scopes), _when(k.created_at), _when(k.expires_at), _when(k.last_used_at),
            _when(k.revoked_at), _limit(k.limits.rpm), _limit(k.limits.tpm), _limit(k.limits.tpd),
        )
    console.print(table)


@app.command("revoke")
def revoke(key_id: str = typer.Argument(..., help="The key's id (see `lmaas keys list`).")) -> None:
    """Revoke a key; gateways refuse it within a few seconds."""
    key = _keys().revoke_key(key_id, actor=ACTOR)
    console.print(f"revoked key {key.id} of tenant {key.tenant}")


@app.command("bootstrap")
def bootstrap() -> None:
    """Create tenant `default` and an admin key unless an admin key exists (or install `LMAAS_ADMIN_KEY`)."""
    from lmaas.auth import ADMIN_KEY_ENV

    secret = _keys().bootstrap(secret=os.environ.get(ADMIN_KEY_ENV) or None, actor=ACTOR)
    if secret is None:
        console.print(f"an admin key exists{' (' + ADMIN_KEY_ENV + ')' if os.environ.get(ADMIN_KEY_ENV) else ''}; nothing to do")
        return
    console.print("created tenant default and its admin key (shown once):")
    print(secret)


@tenants_app.command("create")
def create_tenant(
    name: str = typer.Argument(..., help="1-64 characters of a-z, 0-9, '_', '-'."),
    rpm: int = typer.Option(None, "--rpm", help="Requests per minute for the whole tenant."),
    tpm: int = typer.Option(None, "--tpm", help="Tokens per minute."),
    tpd: int = typer.Option(None, "--tpd", help="Tokens per day."),
) -> None:
    """Create a tenant."""
    from lmaas.auth import Limits

    tenant = _keys().create_tenant(name, Limits(rpm, tpm, tpd), actor=ACTOR)
    console.print(f"created tenant {tenant.name}")


@tenants_app.command("list")
def list_tenants(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List tenants and their limits."""
    tenants = _keys().list_tenants()
    if as_json:
        print(json.dumps([t.to_dict() for t in tenants], indent=1))
        return
    table = Table("name", "created", "rpm", "tpm", "tpd")
    for t in tenants:
        table.add_row(t.name, _when(t.created_at), _limit(t.limits.rpm), _limit(t.limits.tpm), _limit(t.limits.tpd))
    console.print(table)


@tenants_app.command("storage-quota")
def set_storage_quota(
    name: str = typer.Argument(...),
    storage_bytes: int = typer.Option(None, "--bytes", min=0, help="The most its model versions and files may hold (left out: no limit)."),
) -> None:
    """Set a tenant's storage quota: uploads and new model versions past it are refused (413)."""
    tenant = _keys().set_storage_quota(name, storage_bytes, actor=ACTOR)
    console.print(f"tenant {tenant.name}: storage quota {_limit(tenant.storage_bytes)} bytes")


@tenants_app.command("limits")
def set_limits(
    name: str = typer.Argument(...),
    rpm: int = typer.Option(None, "--rpm"),
    tpm: int = typer.Option(None, "--tpm"),
    tpd: int = typer.Option(None, "--tpd"),
) -> None:
    """Replace a tenant's limits (an option left out means no limit)."""
    from lmaas.auth import Limits

    tenant = _keys().set_tenant_limits(name, Limits(rpm, tpm, tpd), actor=ACTOR)
    console.print(f"tenant {tenant.name}: rpm {_limit(tenant.limits.rpm)}, tpm {_limit(tenant.limits.tpm)}, tpd {_limit(tenant.limits.tpd)}")
