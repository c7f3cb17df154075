"""ops: the priority job queue in front of the Ray Jobs API.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queued_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("entrypoint", sa.Text, nullable=True),
        sa.Column("resources", sa.JSON, nullable=False),
        sa.Column("submission_id", sa.String(100), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("admitted_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("message", sa.Text, nullable=False),
        sa.UniqueConstraint("submission_id", name="uq_queued_jobs_submission_id"),
    )
    op.create_index("ix_queued_jobs_state_priority_id", "queued_jobs", ["state", "priority", "id"])


def downgrade() -> None:
    op.drop_index("ix_queued_jobs_state_priority_id", table_name="queued_jobs")
    op.drop_table("queued_jobs")
