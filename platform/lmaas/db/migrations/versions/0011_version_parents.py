"""model_version_parents: the further parents of a version made from several (a weight merge).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_version_parents",
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("parent_id", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("version_id", "position", name="pk_model_version_parents"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], name="fk_model_version_parents_version_id_model_versions"),
        sa.ForeignKeyConstraint(["parent_id"], ["model_versions.id"], name="fk_model_version_parents_parent_id_model_versions"),
    )
    op.create_index("ix_model_version_parents_parent_id", "model_version_parents", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_model_version_parents_parent_id", "model_version_parents")
    op.drop_table("model_version_parents")
