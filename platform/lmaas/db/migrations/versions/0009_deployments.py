"""tenancy: deployment records, one row per served name of a Serve app (its owner tenant and references),
and the tenant that opened each two-step model upload.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("ref", sa.String(300), nullable=False),
        sa.Column("canary_ref", sa.String(300), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("app", "name", name="uq_deployments_app_name"),
    )
    op.create_index("ix_deployments_ref", "deployments", ["ref"])
    op.create_index("ix_deployments_canary_ref", "deployments", ["canary_ref"])
    with op.batch_alter_table("model_uploads") as batch:
        batch.add_column(sa.Column("tenant", sa.String(200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_uploads") as batch:
        batch.drop_column("tenant")
    op.drop_index("ix_deployments_canary_ref", "deployments")
    op.drop_index("ix_deployments_ref", "deployments")
    op.drop_table("deployments")
