"""usage: batch requests and tokens per tenant, key, model and day, counted apart from online ones.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

COLUMNS = ("batch_requests", "batch_prompt_tokens", "batch_completion_tokens")


def upgrade() -> None:
    with op.batch_alter_table("usage") as table:
        for name in COLUMNS:
            table.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage") as table:
        for name in COLUMNS:
            table.drop_column(name)
