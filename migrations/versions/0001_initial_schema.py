"""Initial schema: pools, devices, layers, images, containers and the steps journal.

Column types are written as their SQL storage types (the models' EnumText and UTCDateTime
store plain strings and naive UTC datetimes), so that this revision never changes when the
models' Python code does.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pools',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('engine', sa.String(length=16), nullable=False),
    sa.Column('data_path', sa.String(length=4096), nullable=False),
    sa.Column('metadata_path', sa.String(length=4096), nullable=False),
    sa.Column('data_block_sectors', sa.Integer(), nullable=False),
    sa.Column('low_water_blocks', sa.BigInteger(), nullable=False),
    sa.Column('no_space_policy', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=False),
    sa.Column('pending_transaction_id', sa.BigInteger(), nullable=True),
    sa.Column('next_device_id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("engine IN ('user', 'kernel')", name=op.f('ck_pools_engine')),
    sa.CheckConstraint("name <> ''", name=op.f('ck_pools_name_not_empty')),
    sa.CheckConstraint("no_space_policy IN ('error', 'queue')", name=op.f('ck_pools_no_space_policy')),
    sa.CheckConstraint("state IN ('creating', 'inactive', 'active', 'deleting', 'failed')", name=op.f('ck_pools_state')),
    sa.CheckConstraint('data_block_sectors BETWEEN 128 AND 2097152 AND data_block_sectors % 128 = 0', name=op.f('ck_pools_data_block_sectors')),
    sa.CheckConstraint('low_water_blocks >= 0', name=op.f('ck_pools_low_water_blocks')),
    sa.CheckConstraint('next_device_id BETWEEN 0 AND 16777216', name=op.f('ck_pools_next_device_id')),
    sa.CheckConstraint('pending_transaction_id IS NULL OR pending_transaction_id > transaction_id', name=op.f('ck_pools_pending_transaction_id')),
    sa.CheckConstraint('transaction_id >= 0', name=op.f('ck_pools_transaction_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pools')),
    sa.UniqueConstraint('name', name=op.f('uq_pools_name'))
    )
    op.create_table('devices',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pool_id', sa.Integer(), nullable=False),
    sa.Column('thin_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('origin_id', sa.Integer(), nullable=True),
    sa.Column('virtual_size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('read_only', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('volume', 'snapshot', 'layer', 'container')", name=op.f('ck_devices_kind')),
    sa.CheckConstraint("name <> ''", name=op.f('ck_devices_name_not_empty')),
    sa.CheckConstraint("state IN ('creating', 'inactive', 'active', 'deleting', 'failed')", name=op.f('ck_devices_state')),
    sa.CheckConstraint('origin_id IS NULL OR origin_id <> id', name=op.f('ck_devices_origin_not_self')),
    sa.CheckConstraint('thin_id BETWEEN 0 AND 16777215', name=op.f('ck_devices_thin_id')),
    sa.CheckConstraint('virtual_size_bytes > 0 AND virtual_size_bytes % 512 = 0', name=op.f('ck_devices_virtual_size_bytes')),
    sa.ForeignKeyConstraint(['origin_id'], ['devices.id'], name=op.f('fk_devices_origin_id_devices'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['pool_id'], ['pools.id'], name=op.f('fk_devices_pool_id_pools'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_devices')),
    sa.UniqueConstraint('pool_id', 'name', name=op.f('uq_devices_pool_id_name')),
    sa.UniqueConstraint('pool_id', 'thin_id', name=op.f('uq_devices_pool_id_thin_id'))
    )
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_devices_origin_id'), ['origin_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_devices_pool_id'), ['pool_id'], unique=False)

    op.create_table('steps',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pool_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("(state = 'pending') = (finished_at IS NULL)", name=op.f('ck_steps_finished_iff_not_pending')),
    sa.CheckConstraint("kind <> ''", name=op.f('ck_steps_kind_not_empty')),
    sa.CheckConstraint("state IN ('pending', 'done', 'failed')", name=op.f('ck_steps_state')),
    sa.CheckConstraint('transaction_id IS NULL OR transaction_id >= 0', name=op.f('ck_steps_transaction_id')),
    sa.ForeignKeyConstraint(['pool_id'], ['pools.id'], name=op.f('fk_steps_pool_id_pools'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_steps'))
    )
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.create_index('ix_steps_pool_id_state', ['pool_id', 'state'], unique=False)

    op.create_table('layers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('pool_id', sa.Integer(), nullable=False),
    sa.Column('digest', sa.String(length=135), nullable=False),
    sa.Column('diff_id', sa.String(length=135), nullable=False),
    sa.Column('chain_id', sa.String(length=135), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("chain_id LIKE '%_:_%'", name=op.f('ck_layers_chain_id')),
    sa.CheckConstraint("diff_id LIKE '%_:_%'", name=op.f('ck_layers_diff_id')),
    sa.CheckConstraint("digest LIKE '%_:_%'", name=op.f('ck_layers_digest')),
    sa.CheckConstraint('parent_id IS NULL OR parent_id <> id', name=op.f('ck_layers_parent_not_self')),
    sa.CheckConstraint('size_bytes >= 0', name=op.f('ck_layers_size_bytes')),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_layers_device_id_devices'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['parent_id'], ['layers.id'], name=op.f('fk_layers_parent_id_layers'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['pool_id'], ['pools.id'], name=op.f('fk_layers_pool_id_pools'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_layers')),
    sa.UniqueConstraint('device_id', name=op.f('uq_layers_device_id')),
    sa.UniqueConstraint('pool_id', 'chain_id', name=op.f('uq_layers_pool_id_chain_id'))
    )
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_layers_parent_id'), ['parent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_layers_pool_id'), ['pool_id'], unique=False)

    op.create_table('images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('tag', sa.String(length=128), nullable=False),
    sa.Column('top_layer_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("name <> ''", name=op.f('ck_images_name_not_empty')),
    sa.CheckConstraint("tag <> ''", name=op.f('ck_images_tag_not_empty')),
    sa.ForeignKeyConstraint(['top_layer_id'], ['layers.id'], name=op.f('fk_images_top_layer_id_layers'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images')),
    sa.UniqueConstraint('name', 'tag', name=op.f('uq_images_name_tag'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_images_top_layer_id'), ['top_layer_id'], unique=False)

    op.create_table('containers',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('image_id', sa.Integer(), nullable=True),
    sa.Column('device_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('command', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("finished_at IS NULL OR state IN ('exited', 'failed')", name=op.f('ck_containers_finished_state')),
    sa.CheckConstraint("name <> ''", name=op.f('ck_containers_name_not_empty')),
    sa.CheckConstraint("state <> 'running' OR pid IS NOT NULL", name=op.f('ck_containers_running_has_pid')),
    sa.CheckConstraint("state IN ('created', 'running', 'exited', 'failed')", name=op.f('ck_containers_state')),
    sa.CheckConstraint('pid IS NULL OR pid > 0', name=op.f('ck_containers_pid')),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], name=op.f('fk_containers_device_id_devices'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], name=op.f('fk_containers_image_id_images'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_containers')),
    sa.UniqueConstraint('device_id', name=op.f('uq_containers_device_id')),
    sa.UniqueConstraint('name', name=op.f('uq_containers_name'))
    )
    with op.batch_alter_table('containers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_containers_image_id'), ['image_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('containers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_containers_image_id'))

    op.drop_table('containers')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_top_layer_id'))

    op.drop_table('images')
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_layers_pool_id'))
        batch_op.drop_index(batch_op.f('ix_layers_parent_id'))

    op.drop_table('layers')
    with op.batch_alter_table('steps', schema=None) as batch_op:
        batch_op.drop_index('ix_steps_pool_id_state')

    op.drop_table('steps')
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_pool_id'))
        batch_op.drop_index(batch_op.f('ix_devices_origin_id'))

    op.drop_table('devices')
    op.drop_table('pools')
