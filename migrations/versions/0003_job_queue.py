"""jobs.queue: the broker queue a job's messages go to, computed once at submit

Revision ID: 0003
Revises: 0002
Create Date: 2027-01-10 09:00:00.000000
"""
from alembic import context, op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

jobs = sa.table('jobs', sa.column('id', sa.String), sa.column('status', sa.String), sa.column('spec', sa.JSON),
                sa.column('queue', sa.String))


def upgrade() -> None:
    from store.queue import queue_for
    from store.settings import get_settings

    settings = get_settings()
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue', sa.String(length=200), nullable=True))
    # Existing rows get the default queue; with device routing, a job that may still be sent (queued, or
    # running: the reaper may hand it back) gets the queue the senders routed its spec to until now
    # (store.queue.queue_for, read with the settings `netcompress migrate` runs with).
    op.execute(jobs.update().values(queue=settings.queue))
    if settings.route_by_device and not context.is_offline_mode():
        conn = op.get_bind()
        live = conn.execute(sa.select(jobs.c.id, jobs.c.spec).where(jobs.c.status.in_(['queued', 'running'])))
        for job_id, spec in live.all():
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(queue=queue_for(spec, settings)))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('queue', existing_type=sa.String(length=200), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('queue')
