"""Keyset pagination over ``(created_at, id)``, newest first; the cursor is opaque to clients."""
from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_

from api.errors import Problem


def encode(created_at: datetime, id_: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), id_]).encode()).decode()


def decode(cursor: str) -> tuple[datetime, str]:
    try:
        ts, id_ = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(ts), str(id_)
    except Exception:
        raise Problem(422, "validation_error", "invalid cursor", "use next_cursor from a previous page",
                      [{"path": "$.cursor", "loc": ["cursor"], "message": "invalid cursor"}]) from None


def paginate(session, stmt: Select, model: Any, limit: int, cursor: str | None) -> tuple[list[Any], str | None]:
    if cursor:
        ts, id_ = decode(cursor)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < id_)))
    rows = session.execute(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)).scalars().all()
    nxt = encode(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
    return list(rows[:limit]), nxt
