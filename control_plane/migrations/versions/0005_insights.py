"""insights settings: fail on blocking calls (apps), fail on breaking changes (deployments)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fail_on_blocking", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("fail_on_breaking", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_column("fail_on_breaking")
    with op.batch_alter_table("app", schema=None) as batch_op:
        batch_op.drop_column("fail_on_blocking")
