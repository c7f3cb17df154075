"""What each tenant holds in the artifact store, and its storage quota (`tenants.storage_bytes`).

A tenant's model versions (their `size_bytes`, as stored) and its uploaded files count; datasets
and checkpoints are the platform's (jobs write them) and do not. The check runs in the transaction
that makes the new bytes visible, with the tenant's row locked (PostgreSQL; SQLite's write lock
serializes them already), so two uploads at once cannot both take the last of a quota.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from lmaas.db.schema import files, model_versions, registered_models, tenants
from lmaas.errors import PayloadTooLargeError


def stored_bytes(conn: Connection, tenant: str) -> int:
    """Bytes of `tenant`'s model versions and files in the store."""
    models = sa.select(sa.func.coalesce(sa.func.sum(model_versions.c.size_bytes), 0)).select_from(
        model_versions.join(registered_models, model_versions.c.model_id == registered_models.c.id)
    ).where(registered_models.c.tenant == tenant)
    uploaded = sa.select(sa.func.coalesce(sa.func.sum(files.c.bytes), 0)).where(files.c.tenant == tenant)
    return int(conn.execute(models).scalar_one()) + int(conn.execute(uploaded).scalar_one())


def storage_quota(conn: Connection, tenant: str, *, lock: bool = False) -> int | None:
    """`tenant`'s storage quota in bytes (None: none, or no such tenant row)."""
    query = sa.select(tenants.c.storage_bytes).where(tenants.c.name == tenant)
    return conn.execute(query.with_for_update() if lock else query).scalar()


def check_storage_quota(conn: Connection, tenant: str, adding: int, *, param: str) -> None:
    """Refuse `adding` more bytes for `tenant` past its quota (call inside the transaction that adds them).

    Raises:
        PayloadTooLargeError (413): the quota would be passed; the message says by how much.
    """
    quota = storage_quota(conn, tenant, lock=True)
    if quota is None:
        return
    used = stored_bytes(conn, tenant)
    if used + adding > quota:
        raise PayloadTooLargeError(
            f"{param}: {adding:,} bytes more would pass tenant {tenant!r}'s storage quota ({used:,} of {quota:,} bytes "
            "used); delete files or model versions, or ask an admin for more", param=param)
