"""autoscaling settings, events, traffic slots

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:15:36.913838
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing apps get the model's defaults (server_default), so the upgrade works on a populated database.
    op.create_table(
        "event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("app_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("message", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("data", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_event_app_id"), ["app_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_event_at"), ["at"], unique=False)

    op.create_table(
        "trafficslot",
        sa.Column("app_id", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("peak", sa.Float(), nullable=False),
        sa.Column("weeks", sa.Integer(), nullable=False),
        sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("app_id", "slot"),
    )
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_instances", sa.Integer(), nullable=False, server_default="10"))
        batch_op.add_column(
            sa.Column("target_concurrency", sa.Float(), nullable=False, server_default="10.0")
        )
        batch_op.add_column(sa.Column("prewarm", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("scale_to_zero_after", sa.Float(), nullable=False, server_default="300.0")
        )


def downgrade() -> None:
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.drop_column("scale_to_zero_after")
        batch_op.drop_column("prewarm")
        batch_op.drop_column("target_concurrency")
        batch_op.drop_column("max_instances")

    op.drop_table("trafficslot")
    with op.batch_alter_table("event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_event_at"))
        batch_op.drop_index(batch_op.f("ix_event_app_id"))

    op.drop_table("event")
