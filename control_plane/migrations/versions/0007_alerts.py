"""SLOs, alert webhooks, alert history

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "slo",
        sa.Column("id", _S(), nullable=False),
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("name", _S(), nullable=False),
        sa.Column("kind", _S(), nullable=False),
        sa.Column("target", sa.Float(), nullable=False),
        sa.Column("threshold_ms", sa.Float(), nullable=True),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("state", _S(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["app_id"], ["app.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("slo", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_slo_app_id"), ["app_id"], unique=False)
    op.create_table(
        "webhook",
        sa.Column("id", _S(), nullable=False),
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("url", _S(), nullable=False),
        sa.Column("kind", _S(), nullable=False),
        sa.Column("secret", _S(), nullable=False),
        sa.Column("created_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["app_id"], ["app.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("webhook", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_app_id"), ["app_id"], unique=False)
    op.create_table(
        "alert",
        sa.Column("id", _S(), nullable=False),
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("kind", _S(), nullable=False),
        sa.Column("key", _S(), nullable=False),
        sa.Column("severity", _S(), nullable=False),
        sa.Column("status", _S(), nullable=False),
        sa.Column("message", _S(), nullable=False),
        sa.Column("data", _S(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("resolved_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("deliveries", _S(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alert_app_id"), ["app_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_alert_key"), ["key"], unique=False)
        batch_op.create_index(batch_op.f("ix_alert_started_at"), ["started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alert", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alert_started_at"))
        batch_op.drop_index(batch_op.f("ix_alert_key"))
        batch_op.drop_index(batch_op.f("ix_alert_app_id"))
    op.drop_table("alert")
    with op.batch_alter_table("webhook", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_app_id"))
    op.drop_table("webhook")
    with op.batch_alter_table("slo", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_slo_app_id"))
    op.drop_table("slo")
