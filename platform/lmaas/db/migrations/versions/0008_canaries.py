"""serve: canary rollouts, one row per served model with a canary (the split every gateway replica follows).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "canaries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("app", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("rollout", sa.String(64), nullable=False),
        sa.Column("stable_ref", sa.String(300), nullable=False),
        sa.Column("canary_ref", sa.String(300), nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("app", "model", name="uq_canaries_app_model"),
    )


def downgrade() -> None:
    op.drop_table("canaries")
