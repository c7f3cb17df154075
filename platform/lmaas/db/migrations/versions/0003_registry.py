"""registry: registered models, immutable versions, aliases, uploads in progress.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registered_models",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_version", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_registered_models"),
        sa.UniqueConstraint("name", name="uq_registered_models_name"),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("task", sa.String(50), nullable=False),
        sa.Column("prefix", sa.String(500), nullable=False),
        sa.Column("files", sa.JSON, nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("run", sa.String(500), nullable=True),
        sa.Column("dataset", sa.String(500), nullable=True),
        sa.Column("dataset_sha256", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.Integer, nullable=True),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("signature", sa.String(200), nullable=True),
        sa.Column("encrypted", sa.Boolean, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.ForeignKeyConstraint(["model_id"], ["registered_models.id"], name="fk_model_versions_model_id_registered_models"),
        sa.ForeignKeyConstraint(["parent_id"], ["model_versions.id"], name="fk_model_versions_parent_id_model_versions"),
        sa.UniqueConstraint("model_id", "version", name="uq_model_versions_model_id_version"),
        sa.UniqueConstraint("prefix", name="uq_model_versions_prefix"),
    )
    op.create_index("ix_model_versions_dataset", "model_versions", ["dataset"])
    op.create_index("ix_model_versions_parent_id", "model_versions", ["parent_id"])
    op.create_table(
        "model_aliases",
        sa.Column("model_id", sa.Integer, nullable=False),
        sa.Column("alias", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "alias", name="pk_model_aliases"),
        sa.ForeignKeyConstraint(["model_id"], ["registered_models.id"], name="fk_model_aliases_model_id_registered_models"),
        sa.ForeignKeyConstraint(["version_id"], ["model_versions.id"], name="fk_model_aliases_version_id_model_versions"),
    )
    op.create_table(
        "model_uploads",
        sa.Column("prefix", sa.String(500), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("prefix", name="pk_model_uploads"),
    )


def downgrade() -> None:
    op.drop_table("model_uploads")
    op.drop_table("model_aliases")
    op.drop_table("model_versions")
    op.drop_table("registered_models")
