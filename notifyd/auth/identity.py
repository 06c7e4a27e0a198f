"""Who is calling: the verified identity every handler and query is scoped by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """Taken only from a verified token, never from a body or a path."""

    tenant_id: str
    user_id: str
    role: str  # user | service | admin

    @property
    def is_privileged(self) -> bool:
        """Services and admins act for the whole tenant, not only for themselves."""
        return self.role in ("service", "admin")
