"""Bearer tokens: only a token signed with a configured key and algorithm, carrying the claims
notifyd needs, gets in; everything else answers 401 problem+json with a `WWW-Authenticate`
challenge. Claim names are settings, and ids are opaque strings (`TEN-0001`, `auth0|42`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from notifyd.auth import tokens
from notifyd.auth.identity import Identity
from notifyd.auth.tokens import TokenError, TokenVerifier
from notifyd.ids import OpaqueIdRule
from notifyd.settings import Settings, load_settings
from tests.conftest import DaemonFactory
from tests.helpers import TEST_JWT_SECRET, Api, raw_token, wait_for

PROBLEM_JSON = "application/problem+json"
TENANT = "TEN-0001"


# --- small helpers -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_token(
    header: Mapping[str, Any],
    claims: Mapping[str, Any],
    sign: Callable[[bytes], bytes] | None = None,
) -> str:
    """A JWT assembled by hand, so that pyjwt's own encoding checks cannot stop a forgery."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = b64url(sign(signing_input.encode())) if sign is not None else ""
    return f"{signing_input}.{signature}"


def hmac_sha256(key: bytes) -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(key, message, hashlib.sha256).digest()


def claims(tenant: Any = TENANT, user: Any = "user-1", **extra: Any) -> dict[str, Any]:
    """Default-named claims, valid for ten minutes unless `extra` says otherwise."""
    body: dict[str, Any] = {"exp": int(time.time()) + 600}
    if tenant is not None:
        body["tenant_id"] = tenant
    if user is not None:
        body["user_id"] = user
    body.update(extra)
    return body


async def assert_unauthorized(api: Api, **kw: Any) -> dict[str, Any]:
    """GET /notifications/ answers 401 problem+json with a Bearer challenge."""
    status, body, headers = await api.get("/notifications/", **kw)
    assert status == 401, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert body["status"] == 401
    assert "realm" in parse_bearer_challenge(headers["WWW-Authenticate"])
    return dict(body)


_AUTH_PARAM = re.compile(r'\s*([A-Za-z_]+)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_bearer_challenge(challenge: str) -> dict[str, str]:
    """RFC 9110 auth-params of a `Bearer` challenge; fails unless the whole header parses."""
    assert challenge.startswith("Bearer "), challenge
    rest, params = challenge[len("Bearer ") :], {}
    while rest:
        match = _AUTH_PARAM.match(rest)
        assert match is not None, f"malformed challenge: {challenge!r}"
        assert match.group(1) not in params, f"repeated parameter: {challenge!r}"
        params[match.group(1)] = match.group(2)
        rest = rest[match.end() :]
    return params


async def assert_accepted(api: Api, bearer: str) -> None:
    status, body, _ = await api.get("/notifications/", bearer=bearer)
    assert status == 200, body


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    public_key: Any

    def write_public(self, folder: Path, name: str = "public.pem") -> str:
        path = folder / name
        path.write_bytes(self.public_pem)
        return str(path)


def _pair(private_key: Any) -> KeyPair:
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_key = private_key.public_key()
    public_pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_pem, public_pem, public_key)


@pytest.fixture(scope="module")
def rsa_pair() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def rsa_pair_2() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_pair() -> KeyPair:
    return _pair(ec.generate_private_key(ec.SECP256R1()))


def verifier(**env: str) -> TokenVerifier:
    """A TokenVerifier on settings from `env` (no servers needed: it never connects)."""
    settings: Settings = load_settings({"JWT_SECRET": TEST_JWT_SECRET, **env}, dotenv_file=None)
    rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)
    return TokenVerifier(settings, rule)


# --- HS256: what gets in, what does not --------------------------------------------------------


async def test_valid_hs256_token_is_accepted(api: Api) -> None:
    await assert_accepted(api, raw_token(claims()))


async def test_no_authorization_header_answers_401(api: Api) -> None:
    body = await assert_unauthorized(api, auth=False)
    assert "Bearer" in body["detail"]


async def test_basic_scheme_answers_401(api: Api) -> None:
    basic = "Basic " + base64.b64encode(b"user-1:" + TEST_JWT_SECRET.encode()).decode()
    await assert_unauthorized(api, headers={"Authorization": basic})


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    """RFC 9110: the auth scheme is case-insensitive, so `bearer <jwt>` works too."""
    status, body, _ = await api.get(
        "/notifications/", headers={"Authorization": f"bearer {raw_token(claims())}"}
    )
    assert status == 200, body


def _forged_tokens() -> dict[str, Callable[[], str]]:
    now = int(time.time())
    secret = TEST_JWT_SECRET.encode()

    def tampered() -> str:
        header, _, signature = raw_token(claims()).split(".")
        other = b64url(json.dumps(claims(tenant="TEN-0002")).encode())
        return f"{header}.{other}.{signature}"

    def rs256_when_only_hs_is_configured() -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return jwt.encode(claims(), _pair(key).private_pem, algorithm="RS256")

    return {
        "alg-none": lambda: hand_token({"alg": "none", "typ": "JWT"}, claims()),
        "alg-None": lambda: hand_token({"alg": "None", "typ": "JWT"}, claims()),
        "alg-none-with-hmac-signature": lambda: hand_token(
            {"alg": "none"}, claims(), hmac_sha256(secret)
        ),
        "wrong-secret": lambda: raw_token(claims(), key="another-secret-that-is-long-enough"),
        "tampered-payload": tampered,
        "unconfigured-alg-HS512": lambda: hand_token(
            {"alg": "HS512"}, claims(), lambda m: hmac.new(secret, m, hashlib.sha512).digest()
        ),
        "rs256-without-public-key": rs256_when_only_hs_is_configured,
        "expired-beyond-leeway": lambda: raw_token(claims(exp=now - 120)),
        "nbf-in-future": lambda: raw_token(claims(nbf=now + 300)),
        "iat-in-future": lambda: raw_token(claims(iat=now + 300)),
        "exp-not-a-number": lambda: raw_token(claims(exp="tomorrow")),
        "missing-exp": lambda: jwt.encode(
            {"tenant_id": TENANT, "user_id": "user-1"}, TEST_JWT_SECRET, algorithm="HS256"
        ),
        "missing-tenant": lambda: raw_token(claims(tenant=None)),
        "empty-tenant": lambda: raw_token(claims(tenant="")),
        "tenant-not-a-string": lambda: raw_token(claims(tenant=["TEN-0001"])),
        "tenant-forbidden-char": lambda: raw_token(claims(tenant="TEN 0001")),
        "tenant-slash": lambda: raw_token(claims(tenant="TEN/../0001")),
        "tenant-too-long": lambda: raw_token(claims(tenant="T" * 129)),
        "missing-user-and-sub": lambda: raw_token(claims(user=None)),
        "user-forbidden-char": lambda: raw_token(claims(user="user<script>")),
        "user-too-long": lambda: raw_token(claims(user="u" * 129)),
        "sub-forbidden-char": lambda: raw_token(claims(user=None, sub="a b")),
        "malformed": lambda: "not-a-jwt",
        "two-segments": lambda: ".".join(raw_token(claims()).split(".")[:2]),
    }


FORGERIES = _forged_tokens()


@pytest.mark.parametrize("name", list(FORGERIES))
async def test_verifier_refuses_forged_or_incomplete_token(name: str) -> None:
    """alg none, bad signatures, unconfigured algorithms, time claims, missing or bad ids."""
    with pytest.raises(TokenError):
        await verifier().verify(FORGERIES[name]())


async def test_every_forged_or_incomplete_token_answers_401(api: Api) -> None:
    """The same forgeries against a running daemon: 401 problem+json with a challenge each."""
    let_in: list[str] = []
    for name, forge in FORGERIES.items():
        status, body, headers = await api.get("/notifications/", bearer=forge())
        if not (
            status == 401
            and headers["Content-Type"].startswith(PROBLEM_JSON)
            and body["status"] == 401
            and "realm" in parse_bearer_challenge(headers["WWW-Authenticate"])
        ):
            let_in.append(f"{name}: {status} {body}")
    assert let_in == []


@pytest.mark.parametrize(
    "header",
    [{"alg": "HS256", "kid": 123}, {"alg": "HS256", "crit": ["b64"]}],
    ids=["kid-not-a-string", "unsupported-crit"],
)
async def test_malformed_header_answers_401_not_500(api: Api, header: dict[str, Any]) -> None:
    token = hand_token(header, claims(), hmac_sha256(TEST_JWT_SECRET.encode()))
    await assert_unauthorized(api, bearer=token)


async def test_expiry_within_leeway_is_accepted(api: Api) -> None:
    """`exp` is honoured with a small leeway (default 30 s) for clock skew."""
    await assert_accepted(api, raw_token(claims(exp=int(time.time()) - 5)))


async def test_sub_is_the_user_when_the_user_claim_is_absent(api: Api) -> None:
    status, sent, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "auth0|42", "message": "hi"},
        user="svc",
        role="service",
    )
    assert status == 202, sent
    bearer = raw_token(claims(user=None, sub="auth0|42"))
    status, listed, _ = await api.get("/notifications/", bearer=bearer)
    assert status == 200, listed
    assert [n["id"] for n in listed] == [sent["notification_id"]]


async def test_hostile_alg_text_cannot_break_the_challenge_header(api: Api) -> None:
    """The `alg` is attacker text; it must not inject parameters into WWW-Authenticate."""
    token = hand_token({"alg": 'x", error="forged'}, claims())
    await assert_unauthorized(api, bearer=token)
    _, _, headers = await api.get("/notifications/", bearer=token)
    challenge = headers["WWW-Authenticate"]
    params = parse_bearer_challenge(challenge)
    assert list(params) == ["realm", "error", "error_description"], challenge
    assert params["error"] == "invalid_token"


# --- TokenVerifier directly: identity and role mapping ------------------------------------


async def test_verifier_identity_from_default_claims() -> None:
    token = raw_token(claims(role="admin"))
    assert await verifier().verify(token) == Identity(TENANT, "user-1", "admin")


async def test_verifier_user_claim_wins_over_sub() -> None:
    token = raw_token(claims(user="user-1", sub="auth0|99"))
    assert (await verifier().verify(token)).user_id == "user-1"


async def test_verifier_sub_used_when_user_claim_absent() -> None:
    token = raw_token(claims(user=None, sub="auth0|42"))
    assert (await verifier().verify(token)).user_id == "auth0|42"


@pytest.mark.parametrize(
    ("role_claim", "role"),
    [
        (None, "user"),
        ("service", "service"),
        ("superuser", "user"),
        (["offline", "service"], "service"),
        (["user", "admin", "service"], "admin"),
        (["offline"], "user"),
        (42, "user"),
    ],
)
async def test_verifier_role_is_least_privilege_unless_named(role_claim: Any, role: str) -> None:
    extra = {} if role_claim is None else {"role": role_claim}
    assert (await verifier().verify(raw_token(claims(**extra)))).role == role


async def test_verifier_numeric_ids_become_strings() -> None:
    identity = await verifier().verify(raw_token(claims(tenant=1001, user=42)))
    assert (identity.tenant_id, identity.user_id) == ("1001", "42")


async def test_verifier_rejects_with_a_reason() -> None:
    with pytest.raises(TokenError) as caught:
        await verifier().verify(hand_token({"alg": "none"}, claims()))
    assert caught.value.error == "invalid_token"
    assert "none" in caught.value.reason


async def test_verifier_id_length_is_a_setting() -> None:
    short = verifier(NOTIFYD_ID_MAX_LENGTH="8")
    with pytest.raises(TokenError):
        await short.verify(raw_token(claims(tenant="TEN-00001")))
    assert (await short.verify(raw_token(claims(tenant="TEN-0001")))).tenant_id == "TEN-0001"


# --- RS256 / ES256 and HS/RS confusion -----------------------------------------------------


async def test_rs256_with_public_key_file_and_hs_confusion_refused(
    daemon_factory: DaemonFactory, tmp_path: Path, rsa_pair: KeyPair, rsa_pair_2: KeyPair
) -> None:
    daemon = await daemon_factory(JWT_PUBLIC_KEY_FILE=rsa_pair.write_public(tmp_path))
    async with Api(daemon) as api:
        await assert_accepted(api, jwt.encode(claims(), rsa_pair.private_pem, algorithm="RS256"))
        # HS256 still works with the shared secret, since JWT_SECRET is configured too
        await assert_accepted(api, raw_token(claims()))
        # the classic confusion: HMAC keyed with the (public!) PEM bytes
        confused = hand_token(
            {"alg": "HS256", "typ": "JWT"}, claims(), hmac_sha256(rsa_pair.public_pem)
        )
        await assert_unauthorized(api, bearer=confused)
        # RS256 signed by some other key
        other = jwt.encode(claims(), rsa_pair_2.private_pem, algorithm="RS256")
        await assert_unauthorized(api, bearer=other)


async def test_only_public_key_configured_refuses_every_hs256_token(
    daemon_factory: DaemonFactory, tmp_path: Path, rsa_pair: KeyPair
) -> None:
    daemon = await daemon_factory(
        JWT_SECRET="", JWT_PUBLIC_KEY_FILE=rsa_pair.write_public(tmp_path)
    )
    assert daemon.settings.jwt_secret == ""
    async with Api(daemon) as api:
        await assert_accepted(api, jwt.encode(claims(), rsa_pair.private_pem, algorithm="RS256"))
        for key in (rsa_pair.public_pem, TEST_JWT_SECRET.encode(), b""):
            forged = hand_token({"alg": "HS256", "typ": "JWT"}, claims(), hmac_sha256(key))
            await assert_unauthorized(api, bearer=forged)


async def test_es256_public_key_file_works(
    daemon_factory: DaemonFactory, tmp_path: Path, ec_pair: KeyPair
) -> None:
    daemon = await daemon_factory(
        JWT_SECRET="", JWT_PUBLIC_KEY_FILE=ec_pair.write_public(tmp_path, "ec.pem")
    )
    async with Api(daemon) as api:
        await assert_accepted(api, jwt.encode(claims(), ec_pair.private_pem, algorithm="ES256"))
        confused = hand_token({"alg": "HS256"}, claims(), hmac_sha256(ec_pair.public_pem))
        await assert_unauthorized(api, bearer=confused)


@pytest.mark.parametrize("key_file", ["rsa", "ec"])
async def test_alg_that_does_not_fit_the_key_file_answers_401(
    daemon_factory: DaemonFactory,
    tmp_path: Path,
    rsa_pair: KeyPair,
    ec_pair: KeyPair,
    key_file: str,
) -> None:
    configured, other, alg = (
        (rsa_pair, ec_pair, "ES256") if key_file == "rsa" else (ec_pair, rsa_pair, "RS256")
    )
    daemon = await daemon_factory(JWT_PUBLIC_KEY_FILE=configured.write_public(tmp_path))
    async with Api(daemon) as api:
        await assert_unauthorized(
            api, bearer=jwt.encode(claims(), other.private_pem, algorithm=alg)
        )


# --- JWKS ------------------------------------------------------------------------------------


def jwk(pair: KeyPair, kid: str) -> dict[str, Any]:
    if isinstance(pair.public_key, rsa.RSAPublicKey):
        body: dict[str, Any] = RSAAlgorithm.to_jwk(pair.public_key, as_dict=True)
        alg = "RS256"
    else:
        body = ECAlgorithm.to_jwk(pair.public_key, as_dict=True)
        alg = "ES256"
    return {**body, "kid": kid, "alg": alg, "use": "sig"}


@dataclass
class JwksServer:
    """A local JWKS endpoint whose key set the test changes; counts fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    fetches: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def jwks_server() -> AsyncIterator[JwksServer]:
    server = JwksServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    server.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        await runner.cleanup()


async def test_jwks_keys_verify_and_rotation_refreshes_on_unknown_kid(
    daemon_factory: DaemonFactory,
    jwks_server: JwksServer,
    rsa_pair: KeyPair,
    rsa_pair_2: KeyPair,
    ec_pair: KeyPair,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the cache refuses to refetch more than once every 10 s (an unknown-kid storm must not
    # hammer the auth service); lift that floor so the rotation can be shown without waiting
    monkeypatch.setattr(tokens, "_JWKS_MIN_REFRESH_S", 0.0)
    jwks_server.keys = [jwk(rsa_pair, "k1")]
    daemon = await daemon_factory(JWT_SECRET="", JWT_JWKS_URL=jwks_server.url)
    async with Api(daemon) as api:
        k1 = jwt.encode(claims(), rsa_pair.private_pem, algorithm="RS256", headers={"kid": "k1"})
        await assert_accepted(api, k1)
        fetched = jwks_server.fetches
        await assert_accepted(api, k1)
        assert jwks_server.fetches == fetched, "a known kid is served from the cache"

        jwks_server.keys = [jwk(rsa_pair, "k1"), jwk(ec_pair, "k2")]
        k2 = jwt.encode(claims(), ec_pair.private_pem, algorithm="ES256", headers={"kid": "k2"})
        await assert_accepted(api, k2)
        assert jwks_server.fetches == fetched + 1

        unknown = jwt.encode(
            claims(), rsa_pair.private_pem, algorithm="RS256", headers={"kid": "k9"}
        )
        await assert_unauthorized(api, bearer=unknown)
        # a known kid whose signature comes from another key
        wrong = jwt.encode(
            claims(), rsa_pair_2.private_pem, algorithm="RS256", headers={"kid": "k1"}
        )
        await assert_unauthorized(api, bearer=wrong)
        confused = hand_token(
            {"alg": "HS256", "kid": "k1"}, claims(), hmac_sha256(rsa_pair.public_pem)
        )
        await assert_unauthorized(api, bearer=confused)


async def test_jwks_alg_that_does_not_fit_the_kids_key_answers_401(
    daemon_factory: DaemonFactory, jwks_server: JwksServer, rsa_pair: KeyPair, ec_pair: KeyPair
) -> None:
    jwks_server.keys = [jwk(rsa_pair, "k1"), jwk(ec_pair, "k2")]
    daemon = await daemon_factory(JWT_SECRET="", JWT_JWKS_URL=jwks_server.url)
    async with Api(daemon) as api:
        rs_on_ec = jwt.encode(
            claims(), rsa_pair.private_pem, algorithm="RS256", headers={"kid": "k2"}
        )
        await assert_unauthorized(api, bearer=rs_on_ec)
        es_on_rsa = jwt.encode(
            claims(), ec_pair.private_pem, algorithm="ES256", headers={"kid": "k1"}
        )
        await assert_unauthorized(api, bearer=es_on_rsa)


async def test_jwks_unknown_kid_storm_fetches_at_most_once(
    daemon_factory: DaemonFactory, jwks_server: JwksServer, rsa_pair: KeyPair
) -> None:
    jwks_server.keys = [jwk(rsa_pair, "k1")]
    daemon = await daemon_factory(JWT_SECRET="", JWT_JWKS_URL=jwks_server.url)
    async with Api(daemon) as api:
        good = jwt.encode(claims(), rsa_pair.private_pem, algorithm="RS256", headers={"kid": "k1"})
        await assert_accepted(api, good)
        fetched = jwks_server.fetches
        for i in range(5):
            bad = jwt.encode(
                claims(), rsa_pair.private_pem, algorithm="RS256", headers={"kid": f"x{i}"}
            )
            await assert_unauthorized(api, bearer=bad)
        assert jwks_server.fetches <= fetched + 1


# --- iss / aud -------------------------------------------------------------------------------


ISS = "https://auth.example.com/"
AUD = "notifyd"


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"iss": ISS, "aud": AUD}, 200),
        ({"iss": ISS, "aud": [AUD, "other-api"]}, 200),
        ({"iss": "https://evil.example.com/", "aud": AUD}, 401),
        ({"iss": ISS, "aud": "other-api"}, 401),
        ({"aud": AUD}, 401),
        ({"iss": ISS}, 401),
    ],
    ids=["right", "aud-list", "wrong-iss", "wrong-aud", "missing-iss", "missing-aud"],
)
async def test_issuer_and_audience_checked_when_configured(
    daemon_factory: DaemonFactory, extra: dict[str, Any], status: int
) -> None:
    daemon = await daemon_factory(JWT_ISSUER=ISS, JWT_AUDIENCE=AUD)
    async with Api(daemon) as api:
        bearer = raw_token(claims(**extra))
        if status == 200:
            await assert_accepted(api, bearer)
        else:
            await assert_unauthorized(api, bearer=bearer)


async def test_issuer_and_audience_ignored_when_not_configured(api: Api) -> None:
    await assert_accepted(api, raw_token(claims(iss="anyone", aud="anything")))


# --- custom claim names ----------------------------------------------------------------------


def reminder_body() -> dict[str, Any]:
    interview = datetime.now(UTC) + timedelta(days=2)
    return {
        "application_id": "APP-7",
        "candidate_id": "auth0|42",
        "employer_id": "emp-1",
        "interview_time": interview.isoformat(),
        "reminder_time": (interview - timedelta(hours=24)).isoformat(),
    }


async def test_custom_claim_names_work_end_to_end(daemon_factory: DaemonFactory) -> None:
    """Keycloak-style tokens: `org`, `sub`, and roles in a nested list `realm_access.roles`."""
    daemon = await daemon_factory(
        JWT_TENANT_CLAIM="org", JWT_USER_CLAIM="sub", JWT_ROLE_CLAIM="realm_access.roles"
    )

    def keycloak(roles: list[str], **extra: Any) -> str:
        return raw_token(
            {"org": TENANT, "sub": "svc-hiring", "realm_access": {"roles": roles}, **extra}
        )

    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/reminders/create/", reminder_body(), bearer=keycloak(["offline", "service"])
        )
        assert status == 201, body
        status, listed, _ = await api.get("/reminders/", bearer=keycloak(["offline", "service"]))
        assert status == 200, listed
        assert [r["id"] for r in listed] == [body["reminder_id"]]
        assert listed[0]["created_by"] == "svc-hiring"

        # no known role in the list: least privilege, a plain user may not create reminders
        status, body, _ = await api.post(
            "/reminders/create/", reminder_body(), bearer=keycloak(["offline"])
        )
        assert status == 403, body
        # the default claim names no longer carry the identity
        await assert_unauthorized(api, bearer=raw_token(claims(role="service")))
        await assert_unauthorized(
            api, bearer=raw_token({"tenant_id": TENANT, "sub": "x", "realm_access": {}})
        )


# --- opaque, non-UUID ids --------------------------------------------------------------------


async def test_non_uuid_tenant_and_user_ids_work_end_to_end(api: Api, db: Any) -> None:
    status, sent, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "auth0|42", "message": "Interview booked"},
        tenant="TEN-0001",
        user="svc-hiring",
        role="service",
    )
    assert status == 202, sent
    notification_id = sent["notification_id"]

    status, listed, headers = await api.get("/notifications/", tenant="TEN-0001", user="auth0|42")
    assert status == 200, listed
    assert [n["id"] for n in listed] == [notification_id]
    assert headers["X-Unread-Count"] == "1"
    status, one, _ = await api.get(
        f"/notifications/{notification_id}/", tenant="TEN-0001", user="auth0|42"
    )
    assert status == 200, one

    # the same user id in another tenant is another person
    status, other, _ = await api.get("/notifications/", tenant="TEN-0002", user="auth0|42")
    assert (status, other) == (200, [])

    row = await db.fetchrow(
        "SELECT tenant_id, user_id, created_by FROM notifications WHERE id = $1::uuid",
        notification_id,
    )
    assert dict(row) == {"tenant_id": "TEN-0001", "user_id": "auth0|42", "created_by": "svc-hiring"}

    status, msg, _ = await api.post(
        "/messages/send/",
        {"receiver_id": "google-oauth2|1234", "content": "see you"},
        tenant="TEN-0001",
        user="auth0|42",
    )
    assert status == 201, msg
    status, inbox, _ = await api.get("/messages/", tenant="TEN-0001", user="google-oauth2|1234")
    assert status == 200, inbox
    assert [(m["sender_id"], m["receiver_id"]) for m in inbox] == [
        ("auth0|42", "google-oauth2|1234")
    ]


async def test_a_remembered_token_still_stops_working_when_it_expires() -> None:
    """Verified tokens are remembered (services reuse one for thousands of requests), but
    never past their own expiry: the second look comes from memory, the third is refused."""
    check = verifier(JWT_LEEWAY="0")
    key = TEST_JWT_SECRET.encode()
    token = hand_token(
        {"alg": "HS256", "typ": "JWT"}, claims(exp=int(time.time()) + 2), hmac_sha256(key)
    )
    first = await check.verify(token)
    assert await check.verify(token) is first  # remembered, not verified again

    async def refused() -> bool:
        try:
            await check.verify(token)
        except TokenError:
            return True
        return False  # still valid: asked again until its exp has passed

    # a token remembered forever would never be refused: the wait fails
    await wait_for(refused, timeout=10, interval=0.05)
    with pytest.raises(TokenError, match="expired"):
        await check.verify(token)


async def test_a_refused_token_is_not_remembered() -> None:
    check = verifier()
    forged = hand_token({"alg": "HS256", "typ": "JWT"}, claims(), hmac_sha256(b"wrong"))
    for _ in range(2):
        with pytest.raises(TokenError, match="signature"):
            await check.verify(forged)
