"""Bearer token verification: HS256 with a shared secret, RS/ES with a key file or a JWKS URL.

notifyd adopts the auth service a team already runs, so the claim names are settings and the
role claim may be a string or a list (Keycloak-style). The accepted algorithms are fixed by
configuration, never by the token: `alg: none`, HS/RS confusion and unconfigured algorithms are
refused before any key is looked at.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from notifyd.auth.identity import Identity
from notifyd.ids import OpaqueIdRule
from notifyd.settings import ROLES, Settings

_ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
_JWKS_MIN_REFRESH_S = 10.0


class TokenError(Exception):
    """The token cannot be trusted; `reason` is safe to show the caller."""

    def __init__(self, reason: str, *, error: str = "invalid_token") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by exact name, else by dotted path (`realm_access.roles`)."""
    if name in claims:
        return claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def role_from_claim(value: Any) -> str:
    """The strongest known role named by the claim; least privilege when none is known."""
    names = value if isinstance(value, list) else [value]
    known = [n for n in names if isinstance(n, str) and n in _ROLE_RANK]
    return max(known, key=_ROLE_RANK.__getitem__) if known else "user"


class JwksCache:
    """Keys from a JWKS URL, refreshed on an unknown `kid` (at most every few seconds)."""

    def __init__(self, url: str, ttl: float, session: aiohttp.ClientSession) -> None:
        self._url = url
        self._ttl = ttl
        self._session = session
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        if now - self._fetched_at > self._ttl:
            await self._refresh(force=True)
        found = self._lookup(kid)
        if found is None:
            await self._refresh(force=False)
            found = self._lookup(kid)
        if found is None:
            raise TokenError("token signed with an unknown key")
        return found

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            if not force and time.monotonic() - self._fetched_at < _JWKS_MIN_REFRESH_S:
                return
            try:
                timeout = aiohttp.ClientTimeout(total=5)
                async with self._session.get(self._url, timeout=timeout) as response:
                    response.raise_for_status()
                    document = await response.json(content_type=None)
                keyset = jwt.PyJWKSet.from_dict(document)
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError) as exc:
                self._fetched_at = time.monotonic()  # do not hammer a failing endpoint
                if self._keys:
                    return  # keep serving the keys we have
                raise TokenError(
                    "signing keys are unavailable", error="temporarily_unavailable"
                ) from exc
            self._keys = {k.key_id or f"#{i}": k for i, k in enumerate(keyset.keys)}
            self._fetched_at = time.monotonic()


VERIFIED_TTL = 60.0  # seconds a verified token is remembered at most
VERIFIED_MAX = 10_000  # tokens remembered at most (oldest forgotten first)


class TokenVerifier:
    def __init__(
        self,
        settings: Settings,
        id_rule: OpaqueIdRule,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._settings = settings
        self._id_rule = id_rule
        self._algorithms = frozenset(settings.effective_jwt_algorithms)
        self._public_key: Any = None
        if settings.jwt_public_key_file:
            self._public_key = load_public_key(Path(settings.jwt_public_key_file))
        self._jwks: JwksCache | None = None
        if settings.jwt_jwks_url:
            if session is None:
                raise ValueError("a JWKS URL needs an HTTP session")
            self._jwks = JwksCache(settings.jwt_jwks_url, settings.jwt_jwks_cache_seconds, session)
        self._verified: dict[str, tuple[Identity, float]] = {}

    async def verify(self, token: str) -> Identity:
        """The token's identity. A service sends thousands of requests with one token:
        a token verified once is remembered (by its exact text) until it expires, and for
        at most VERIFIED_TTL seconds, so a signing key that is withdrawn stops working
        soon after. Tokens that fail are never remembered."""
        known = self._verified.get(token)
        if known is not None:
            identity, until = known
            if time.time() < until:
                return identity
            del self._verified[token]
        identity, expires = await self._verify(token)
        if len(self._verified) >= VERIFIED_MAX:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = (identity, min(expires, time.time() + VERIFIED_TTL))
        return identity

    async def verify_until(self, token: str) -> tuple[Identity, float]:
        """The token's identity and the moment it stops being accepted (its `exp` plus
        JWT_LEEWAY, in seconds since the epoch): a WebSocket verifies its token once and
        is closed at that moment unless the client refreshes it. Never remembered: a
        socket verifies once for its whole life, so there is nothing to save. Every
        accepted token has an `exp` (it is required), so every socket has a deadline."""
        return await self._verify(token)

    async def _verify(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise TokenError(f"algorithm {alg!r} is not accepted")
        key = await self._key_for(alg, header.get("kid"))
        s = self._settings
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                leeway=s.jwt_leeway,
                issuer=s.jwt_issuer or None,
                audience=s.jwt_audience or None,
                options={"require": ["exp"], "verify_aud": bool(s.jwt_audience)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token is not valid yet") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token has no {exc.claim!r} claim") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token audience is not accepted") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except (jwt.InvalidTokenError, TypeError, ValueError):
            # TypeError/ValueError: pyjwt refusing a key for an algorithm; same answer
            raise TokenError("token is not valid") from None
        return self._identity(claims), float(claims["exp"]) + s.jwt_leeway

    async def _key_for(self, alg: str, kid: Any) -> Any:
        if alg.startswith("HS"):
            return self._settings.jwt_secret
        if self._jwks is not None:
            key = (await self._jwks.key(kid if isinstance(kid, str) else None)).key
        elif self._public_key is not None:
            key = self._public_key
        else:
            raise TokenError(f"algorithm {alg!r} is not accepted")
        if not _key_fits(key, alg):
            raise TokenError(f"algorithm {alg!r} does not match the signing key")
        return key

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        s = self._settings
        tenant = claim(claims, s.jwt_tenant_claim)
        if tenant is None:
            raise TokenError(f"token has no {s.jwt_tenant_claim!r} claim")
        user = claim(claims, s.jwt_user_claim)
        if user is None:
            user = claims.get("sub")
        if user is None:
            raise TokenError(f"token has no {s.jwt_user_claim!r} or 'sub' claim")
        if isinstance(tenant, int):
            tenant = str(tenant)
        if isinstance(user, int):
            user = str(user)
        for name, value in ((s.jwt_tenant_claim, tenant), (s.jwt_user_claim, user)):
            problem = self._id_rule.problem(value)
            if problem is not None:
                raise TokenError(f"claim {name!r} {problem}")
        return Identity(
            tenant_id=tenant, user_id=user, role=role_from_claim(claim(claims, s.jwt_role_claim))
        )


def _key_fits(key: Any, alg: str) -> bool:
    """Whether `alg` is an algorithm of `key`'s family (an RSA key never verifies ES256)."""
    if isinstance(key, rsa.RSAPublicKey):
        return alg.startswith(("RS", "PS"))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return alg.startswith("ES")
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return alg == "EdDSA"
    return False


def load_public_key(path: Path) -> Any:
    """A PEM public key, or the first key of a JWKS document stored in a file."""
    data = path.read_bytes()
    if data.lstrip().startswith(b"{"):
        return jwt.PyJWKSet.from_dict(json.loads(data)).keys[0].key
    return load_pem_public_key(data)


def mint_token(
    settings: Settings,
    *,
    tenant_id: str,
    user_id: str,
    role: str = "user",
    ttl: int | None = None,
    private_key_pem: bytes | None = None,
    algorithm: str | None = None,
) -> str:
    """A signed token in the configured claim names, for local use and tests."""
    now = int(time.time())
    claims: dict[str, Any] = {
        settings.jwt_tenant_claim: tenant_id,
        settings.jwt_user_claim: user_id,
        settings.jwt_role_claim: role,
        "iat": now,
        "exp": now + (ttl if ttl is not None else settings.jwt_expiry),
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if private_key_pem is not None:
        return jwt.encode(claims, private_key_pem, algorithm=algorithm or "RS256")
    if not settings.jwt_secret:
        raise ValueError("JWT_SECRET is not set; pass a private key to sign with RS256/ES256")
    return jwt.encode(claims, settings.jwt_secret, algorithm=algorithm or "HS256")
