"""registry: the declared files of a two-step (REST) upload, so each PUT and the commit can check them.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_uploads") as batch:
        batch.add_column(sa.Column("files", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_uploads") as batch:
        batch.drop_column("files")
