"""The saga log, the files registry and the transactional outbox, written together by the upload saga.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = "state IN ('running', 'compensating')"
# On SQLite times are UTC ISO-8601 text (text order is time order in one zone) and JSON is text.
TIMESTAMP = sa.DateTime(timezone=True).with_variant(sa.Text(), "sqlite")
JSON = postgresql.JSONB().with_variant(sa.Text(), "sqlite")


def json_default() -> sa.TextClause:
    return sa.text("'{}'") if op.get_context().dialect.name == "sqlite" else sa.text("'{}'::jsonb")


def upgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    op.create_table(
        "sagas",
        sa.Column("saga_id", sa.Text(), primary_key=True),
        sa.Column("kind", sa.Text(), nullable=False),  # upload | delete | transfer
        sa.Column("subject_id", sa.Text(), nullable=False),  # the upload id or the file id
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=True),  # the last step completed
        sa.Column("data", JSON, nullable=False, server_default=json_default()),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.Text(), nullable=True),  # the node running it
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint(
            "state IN ('running', 'compensating', 'completed', 'compensated', 'failed')", name="sagas_state"
        ),
    )
    # One unfinished saga per subject: two nodes finalising the same upload cannot both start a saga.
    op.create_index(
        "sagas_one_unfinished",
        "sagas",
        ["kind", "subject_id"],
        unique=True,
        postgresql_where=sa.text(UNFINISHED),
        sqlite_where=sa.text(UNFINISHED),
    )
    # latest_saga: the newest saga of a subject, in any state.
    op.create_index("sagas_by_subject", "sagas", ["kind", "subject_id", "created_at"])
    # Recovery: unfinished sagas whose lease has run out; list_sagas by state.
    op.create_index("sagas_by_lease", "sagas", ["state", "lease_expires_at"])

    op.create_table(
        "files",
        sa.Column("file_id", sa.Text(), primary_key=True),
        sa.Column("upload_id", sa.Text(), nullable=True),  # NULL for files that did not arrive over tus
        sa.Column("original_filename", sa.Text(), nullable=False),
        sa.Column("storage_filename", sa.Text(), nullable=False),
        sa.Column("storage_element_id", sa.Text(), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.Text(), nullable=False),
        sa.Column("content_encoding", sa.Text(), nullable=True),
        sa.Column("md5", sa.Text(), nullable=False),
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Text(), nullable=True),
        sa.Column("created_by_username", sa.Text(), nullable=False),
        sa.Column("retention_policy", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("metadata", JSON, nullable=False, server_default=json_default()),
        sa.Column("uploaded_at", TIMESTAMP, nullable=False),
    )
    op.create_index("files_by_upload", "files", ["upload_id"])

    # SQLite numbers rows itself only for a column declared exactly INTEGER PRIMARY KEY; AUTOINCREMENT keeps
    # it from reusing the id of a purged message.
    if sqlite:
        message_id = sa.Column("message_id", sa.Integer(), primary_key=True)
    else:
        message_id = sa.Column("message_id", sa.BigInteger(), sa.Identity(), primary_key=True)
    op.create_table(
        "outbox",
        message_id,
        sa.Column("kind", sa.Text(), nullable=False),  # redis_stream | webhook
        sa.Column("destination", sa.Text(), nullable=False),  # stream name or URL
        sa.Column("payload", JSON, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("delivered_at", TIMESTAMP, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sqlite_autoincrement=True,
    )
    # The sender's claim: undelivered messages by due time. Delivered ones pile up, so keep them out.
    op.create_index(
        "outbox_due",
        "outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL"),
        sqlite_where=sa.text("delivered_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("files")
    op.drop_table("sagas")
