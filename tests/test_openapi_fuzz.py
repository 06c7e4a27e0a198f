"""Fuzzing every documented operation against a real daemon with schemathesis.

Promise: for every operation in /openapi.json (WebSockets aside), requests generated from
the document, valid and invalid alike, never get a 5xx, and every answer is one the document
describes: a documented status, its content type, headers and body schema. And the document
and the server agree: what it allows is accepted, what it forbids is refused (but for the
422s it names for rules it cannot state, `STATEFUL_REFUSALS`).

Generation is derandomized (the same cases every run, so a failure reproduces) and bounded
per operation. Hypothesis runs in a worker thread: its test function is synchronous and uses
`requests`, while the daemon serves from this test's event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.core.result import Ok

from notifyd.app import Daemon
from notifyd.http.openapi import build_document
from notifyd.http.problems import UNSENDABLE
from notifyd.settings import ROLES
from tests.helpers import token

SCHEMA = schemathesis.openapi.from_dict(build_document())
# every case carries a valid bearer token (below): a case without one would be the token's
# test, not the payload's (tests/test_auth.py has those)
SCHEMA.config.generation.update(with_security_parameters=False)
EXAMPLES = 20  # per operation and generation mode


# 422s the document gives to requests it allows: they depend on state, not on the request's
# shape (whether a template exists, a number is one in the tenant's region; whether this
# Idempotency-Key came with another body before), or on a rule JSON Schema cannot state (the
# clock: an interview ahead of now; two fields compared: a reminder before its interview)
STATEFUL_REFUSALS = {
    f"urn:notifyd:problem:{UNSENDABLE}",
    "urn:notifyd:problem:idempotency-key-reused",
}


def accepts_what_the_document_allows(ctx: Any, response: Any, case: Any) -> bool | None:
    """`positive_data_acceptance`, less the `STATEFUL_REFUSALS`."""
    if response.status_code == 422 and response.json().get("type") in STATEFUL_REFUSALS:
        return None
    result: bool | None = checks.positive_data_acceptance(ctx, response, case)
    return result


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]
# "The document forbids it, the server accepts it" and the reverse, on every operation: the
# payloads' schemas are generated from the models the server validates with (notifyd/schemas/);
# what the document cannot state is answered as one of the `STATEFUL_REFUSALS`
AGREEMENT_CHECKS = [checks.negative_data_rejection, accepts_what_the_document_allows]

Operation = schemathesis.APIOperation[Any, Any, Any, Any]


def _fuzzed(operation: Operation) -> bool:
    # WebSocket upgrades are not plain requests; /api/... are the same handlers again
    return not operation.path.startswith(("/ws/", "/api/"))


def _operations() -> dict[str, Operation]:
    found: dict[str, Operation] = {}
    for result in SCHEMA.get_all_operations():
        if not isinstance(result, Ok):
            raise result.err()  # the document itself is invalid: say so at collection
        if _fuzzed(operation := result.ok()):
            found[operation.label] = operation
    return found


OPERATIONS = _operations()


@dataclass(frozen=True)
class KnownBug:
    """A handler bug the fuzzer found: its operation is xfail(strict=True) until it is fixed,
    and `request` (Case fields) reproduces it first, so the xfail never depends on luck."""

    reason: str
    request: dict[str, Any]


# None open. (The last one, POST /rooms/ with {"members": [["user-2"]]} answering 500, is
# fixed and kept as a regression test in tests/test_chat.py.)
KNOWN_BUGS: dict[str, KnownBug] = {}


def fuzz(operation: Operation, base_url: str, bearers: list[str]) -> None:
    session = requests.Session()
    session.trust_env = False  # loopback: no proxy from the environment
    answer_checks = CHECKS + AGREEMENT_CHECKS
    modes = [operation.as_strategy(generation_mode=GenerationMode.POSITIVE)]
    if operation.body or any(True for _ in operation.iter_parameters()):
        modes.append(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

    def answers_as_documented(case: Any, bearer: str) -> None:
        response = case.call(
            base_url=base_url,
            session=session,
            headers={"Authorization": f"Bearer {bearer}"},
            timeout=10,
        )
        if response.status_code == 400 and response.headers.get("Content-Type", "").startswith(
            "text/plain"
        ):
            # aiohttp's HTTP parser refused the request line or a header (over its 8190-byte
            # line limit) before any route ran: a transport limit, not an API answer (every
            # answer of notifyd's own is JSON or problem+json)
            assert b"Got more than" in response.content, response.content[:200]
            return
        case.validate_response(response, checks=answer_checks)

    bug = KNOWN_BUGS.get(operation.label)
    if bug is not None:
        answers_as_documented = example(case=operation.Case(**bug.request), bearer=bearers[0])(
            answers_as_documented
        )
    run = settings(
        max_examples=EXAMPLES * len(modes),
        deadline=None,
        derandomize=True,  # the same cases every run: a failure here reproduces
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )(given(case=st.one_of(modes), bearer=st.sampled_from(bearers))(answers_as_documented))
    try:
        run()
    finally:
        session.close()


@pytest.mark.parametrize(
    "label",
    [
        pytest.param(
            label,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[label].reason)]
            if label in KNOWN_BUGS
            else [],
        )
        for label in OPERATIONS
    ],
)
async def test_operation_answers_as_documented(daemon: Daemon, label: str) -> None:
    # every role: what one may not do must be a documented 403, not an undocumented answer
    bearers = [token(daemon.settings, "TEN-FUZZ", "fuzzer", role) for role in ROLES]
    base_url = f"http://127.0.0.1:{daemon.port}"
    await asyncio.to_thread(fuzz, OPERATIONS[label], base_url, bearers)
