"""The uploads table: one row per tus upload, the durable half of the SessionStore.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# The SQLite stores keep times as UTC ISO-8601 text: text order is time order in one zone.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.Text(), "sqlite")


def upgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    # PostgreSQL holds the parts as text[] (GIN-indexed below); SQLite as a JSON array in text.
    if sqlite:
        parts = sa.Column("parts", sa.Text(), nullable=False, server_default="[]")
    else:
        parts = sa.Column("parts", postgresql.ARRAY(sa.Text()), nullable=False, server_default="{}")
    op.create_table(
        "uploads",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("upload_length", sa.BigInteger(), nullable=True),  # NULL while the length is deferred
        sa.Column("upload_offset", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("metadata", sa.Text(), nullable=False, server_default=""),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False, server_default="single"),
        parts,
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=True),
    )
    # The expiry sweep: ACTIVE uploads ordered by expires_at.
    op.create_index("uploads_expiry", "uploads", ["state", "expires_at"])
    if sqlite:
        return  # no GIN on SQLite; its json_each lookup reads the few final uploads
    # Only final uploads have parts, so a partial GIN index stays tiny and serves `parts @> ARRAY[id]`
    # when a partial upload is terminated or expires.
    op.create_index(
        "uploads_final_parts",
        "uploads",
        ["parts"],
        postgresql_using="gin",
        postgresql_where=sa.text("kind = 'final'"),
    )


def downgrade() -> None:
    op.drop_table("uploads")
