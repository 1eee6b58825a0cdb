"""uploads.owner_id / owner_name: who created an upload, so only they or an admin may touch it.

The owner is the token's subject (invariant 7); owner_name is the token's name, kept so the file
the upload becomes records its creator's display name even when recovery finishes it. Both are
NULL on uploads made before owners were recorded: only an admin may touch those.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("uploads", sa.Column("owner_id", sa.Text(), nullable=True))
    op.add_column("uploads", sa.Column("owner_name", sa.Text(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite rebuilds the table where it cannot drop a column in place; PostgreSQL just drops it.
    with op.batch_alter_table("uploads") as batch:
        batch.drop_column("owner_name")
        batch.drop_column("owner_id")
