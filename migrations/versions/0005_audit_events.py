"""audit_events: one row per file operation and per refused authorization (issue 12, point 5).

Written in the same transaction as the change it records (an upload created, completed, failed or
terminated; a file deleted or transferred); a refusal changes nothing and is written on its own.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# On SQLite times are UTC ISO-8601 text (text order is time order in one zone) and lists are JSON text.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.Text(), "sqlite")
IDS = postgresql.ARRAY(sa.Text()).with_variant(sa.Text(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("at", TIMESTAMP, nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("subject_name", sa.Text(), nullable=True),
        sa.Column("client_address", sa.Text(), nullable=True),
        sa.Column("upload_id", sa.Text(), nullable=True),
        sa.Column("file_id", sa.Text(), nullable=True),
        sa.Column("element_ids", IDS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.CheckConstraint("outcome IN ('ok', 'refused', 'failed')", name="audit_events_outcome"),
    )
    op.create_index("audit_events_by_time", "audit_events", ["at"])
    op.create_index("audit_events_by_subject", "audit_events", ["subject", "at"])
    op.create_index("audit_events_by_upload", "audit_events", ["upload_id"])


def downgrade() -> None:
    op.drop_table("audit_events")
