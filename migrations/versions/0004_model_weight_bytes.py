"""models.weight_bytes: the bytes of an uploaded model's tensors, which say whether it is large (external data)

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-20 09:00:00.000000
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows uploaded before it was counted are treated as not large (every such upload was refused
    # above 2 GB, or stored as a zip whose jobs ran as they did before).
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('weight_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('weight_bytes')
