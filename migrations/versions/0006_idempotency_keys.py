"""idempotency_keys: the Idempotency-Key of a creation, so a retried POST finds its first upload (issue 17).

One row per (subject, key): the key is the client's, scoped to the token's subject, so two callers
never share one. It names the upload the first request made (its id is chosen before the body is
read) and the fingerprint of that request; it expires with UPLOAD_SESSION_TTL_HOURS.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# On SQLite times are UTC ISO-8601 text (text order is time order in one zone).
TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.Text(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("upload_id", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("subject", "idempotency_key", name="idempotency_keys_pkey"),
    )
    op.create_index("idempotency_keys_expiry", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
