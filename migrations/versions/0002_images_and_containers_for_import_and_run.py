"""Images and containers for import and run.

Images record their pool, config digest, run defaults (OCI config) and source; containers
record what the user asked for (config) and what was set up for them (runtime), so teardown
knows what to undo. The JSON columns get a server default of '{}' so that rows written by
revision 0001 upgrade in place.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 02:50:32.317931
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | Sequence[str] | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('containers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('config', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('runtime', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('started_at', sa.DateTime(), nullable=True))

    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pool_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('digest', sa.String(length=135), nullable=True))
        batch_op.add_column(sa.Column('config', sa.JSON(), nullable=False, server_default='{}'))
        batch_op.add_column(sa.Column('source', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_images_pool_id'), ['pool_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_images_pool_id_pools'), 'pools', ['pool_id'], ['id'], ondelete='RESTRICT')



def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_images_pool_id_pools'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_images_pool_id'))
        batch_op.drop_column('source')
        batch_op.drop_column('config')
        batch_op.drop_column('digest')
        batch_op.drop_column('pool_id')

    with op.batch_alter_table('containers', schema=None) as batch_op:
        batch_op.drop_column('started_at')
        batch_op.drop_column('runtime')
        batch_op.drop_column('config')

