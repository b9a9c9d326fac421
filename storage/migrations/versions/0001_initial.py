"""Initial catalog schema.

Written with literal ``op.create_table`` calls and no import of the live ORM, so
it keeps meaning the same thing after ``storage.models`` evolves.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TABLES = (
    "changes",
    "catalog_state",
    "embeddings",
    "spaces",
    "tags",
    "aliases",
    "version_parents",
    "versions",
    "skills",
)


def _when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "skills",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("last_version", sa.Integer, nullable=False),
        sa.Column("created", _when(), nullable=False),
    )
    op.create_table(
        "versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "skill_id",
            sa.Integer,
            sa.ForeignKey("skills.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("ranks", sa.JSON, nullable=False),
        sa.Column("targets", sa.JSON, nullable=False),
        sa.Column("base", sa.JSON, nullable=False),
        sa.Column("base_id", sa.String(64), nullable=False),
        sa.Column("learner", sa.String(200), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("spaces", sa.JSON, nullable=False),
        sa.Column("created", _when(), nullable=False),
        sa.UniqueConstraint("skill_id", "version", name="uq_versions_skill_version"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_versions_created", "versions", ["created"])
    op.create_index("ix_versions_learner_created", "versions", ["learner", "created"])
    op.create_index("ix_versions_base_id_created", "versions", ["base_id", "created"])
    op.create_index("ix_versions_digest", "versions", ["digest"])
    op.create_table(
        "version_parents",
        sa.Column(
            "child_id",
            sa.Integer,
            sa.ForeignKey("versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("parent_name", sa.String(200), primary_key=True),
        sa.Column("parent_version", sa.Integer, primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
    )
    op.create_index(
        "ix_version_parents_parent", "version_parents", ["parent_name", "parent_version"]
    )
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "skill_id",
            sa.Integer,
            sa.ForeignKey("skills.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("alias", sa.String(200), nullable=False),
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.UniqueConstraint("skill_id", "alias", name="uq_aliases_skill_alias"),
    )
    op.create_index("ix_aliases_version_id", "aliases", ["version_id"])
    op.create_table(
        "tags",
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("versions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_index("ix_tags_key_value", "tags", ["key", "value"])
    op.create_table(
        "spaces",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("dim", sa.Integer, nullable=False),
    )
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "version_id",
            sa.Integer,
            sa.ForeignKey("versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("space", sa.String(200), nullable=False),
        sa.Column("row", sa.Integer, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("version_id", "space", "row", name="uq_embeddings_version_space_row"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_embeddings_space_id", "embeddings", ["space", "id"])
    op.create_index("ix_embeddings_version", "embeddings", ["version_id"])
    state = op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("uid", sa.String(32), nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(state, [{"id": 1, "uid": uuid.uuid4().hex, "generation": 0}])
    op.create_table(
        "changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("space", sa.String(200), nullable=False),
        sa.Column("op", sa.String(8), nullable=False),
        sa.Column("version_id", sa.Integer, nullable=False),
    )
    op.create_index("ix_changes_space_generation", "changes", ["space", "generation"])


def downgrade() -> None:
    for table in _TABLES:
        op.drop_table(table)
