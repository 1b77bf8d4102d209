"""Teams and API keys: keys are random, shown once, stored as sha256, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from store.models import ApiKey, Team, utcnow

KEY_PREFIX = "nc_"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_team(session: Session, name: str) -> Team:
    team = session.execute(select(Team).where(Team.name == name)).scalar_one_or_none()
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def create_key(session: Session, team: Team) -> str:
    """Make a key for ``team``; the plain key is returned once and never stored."""
    prefix = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(team_id=team.id, prefix=prefix, key_hash=_hash(key)))
    session.flush()
    return key


def revoke_key(session: Session, key: str) -> bool:
    row = _lookup(session, key)
    if row is None:
        return False
    row.revoked_at = utcnow()
    session.flush()
    return True


def _lookup(session: Session, key: str) -> ApiKey | None:
    if not key.startswith(KEY_PREFIX) or key.count("_") < 2:
        return None
    prefix = key[len(KEY_PREFIX):].split("_", 1)[0]
    # the team comes in the same query: authentication is on every request's path
    row = session.execute(select(ApiKey).options(joinedload(ApiKey.team)).where(ApiKey.prefix == prefix)
                          ).scalar_one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, _hash(key)):
        return None
    return row


def authenticate(session: Session, key: str) -> Team | None:
    """The key's team, or None for an unknown or revoked key."""
    row = _lookup(session, key)
    if row is None or row.revoked_at is not None:
        return None
    return row.team
