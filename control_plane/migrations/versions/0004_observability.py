"""metric rollups, spans, trace summaries

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 19:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table(
        "metricpoint",
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("resolution", sa.Integer(), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("route", _S(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("client_errors", sa.Integer(), nullable=False),
        sa.Column("duration_sum", sa.Float(), nullable=False),
        sa.Column("hist", _S(), nullable=False),
        sa.Column("bytes_in", sa.BigInteger(), nullable=False),
        sa.Column("bytes_out", sa.BigInteger(), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False),
        sa.Column("queue_wait_sum", sa.Float(), nullable=False),
        sa.Column("cold_starts", sa.Integer(), nullable=False),
        sa.Column("concurrency_max", sa.Float(), nullable=False),
        sa.Column("concurrency_avg", sa.Float(), nullable=False),
        sa.Column("serving", sa.Integer(), nullable=False),
        sa.Column("warm", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("app_id", "resolution", "ts", "route"),
    )
    op.create_table(
        "span",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trace_id", _S(), nullable=False),
        sa.Column("span_id", _S(), nullable=False),
        sa.Column("parent_span_id", _S(), nullable=False),
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("deployment_id", _S(), nullable=False),
        sa.Column("instance_id", _S(), nullable=False),
        sa.Column("service", _S(), nullable=False),
        sa.Column("name", _S(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("start_ns", sa.BigInteger(), nullable=False),
        sa.Column("end_ns", sa.BigInteger(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("status_message", _S(), nullable=False),
        sa.Column("attributes", _S(), nullable=False),
        sa.Column("events", _S(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("span", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_span_trace_id"), ["trace_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_span_app_id"), ["app_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_span_start_ns"), ["start_ns"], unique=False)
    op.create_table(
        "tracesummary",
        sa.Column("trace_id", _S(), nullable=False),
        sa.Column("app_id", _S(), nullable=False),
        sa.Column("started_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("duration_ms", sa.Float(), nullable=False),
        sa.Column("name", _S(), nullable=False),
        sa.Column("route", _S(), nullable=False),
        sa.Column("method", _S(), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=False),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.Column("span_count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("trace_id", "app_id"),
    )
    with op.batch_alter_table("tracesummary", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tracesummary_started_at"), ["started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tracesummary", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracesummary_started_at"))
    op.drop_table("tracesummary")
    with op.batch_alter_table("span", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_span_start_ns"))
        batch_op.drop_index(batch_op.f("ix_span_app_id"))
        batch_op.drop_index(batch_op.f("ix_span_trace_id"))
    op.drop_table("span")
    op.drop_table("metricpoint")
