"""Who is calling: the verified identity every handler and query is scoped by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Taken only from a verified token, never from a body or a path."""

    tenant_id: str
    user_id: str
    role: str  # user | service | admin; what each may do is auth/policy.py's
