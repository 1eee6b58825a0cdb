"""uploads.completion_pending: the durable record that a complete upload's finalisation is owed.

Written by the same UPDATE that commits the last byte, cleared once the upload saga exists; recovery
on every node finishes the uploads that still have it (a crash between the two strands nothing).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        # SQLite has no boolean: 0 and 1, and the partial index must name the stores' own test to be used.
        column = sa.Column("completion_pending", sa.Integer(), nullable=False, server_default="0")
        pending = sa.text("completion_pending = 1")
    else:
        column = sa.Column("completion_pending", sa.Boolean(), nullable=False, server_default="false")
        pending = sa.text("completion_pending")
    op.add_column("uploads", column)
    # Recovery's question, "which completions are owed, oldest first", touches only the few pending rows.
    op.create_index(
        "uploads_completion_pending",
        "uploads",
        ["updated_at"],
        postgresql_where=pending,
        sqlite_where=pending,
    )


def downgrade() -> None:
    op.drop_index("uploads_completion_pending", table_name="uploads")
    # Batch mode: SQLite rebuilds the table where it cannot drop a column in place; PostgreSQL just drops it.
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("completion_pending")
