"""Every permission is decided in `auth/policy.py`, and decided the same way for every role.

Promises checked here: a handler never compares roles itself (it asks the policy and only
phrases the refusal); each decision, role by role, is the one docs/api.md describes; and the
decisions no other test reached through the API (a `critical` send from a user's token, a
service entering a group room it is not in but never a 1-on-1 room) hold end to end.
"""

from __future__ import annotations

import ast
from pathlib import Path

import asyncpg
import pytest

from notifyd.app import Daemon
from notifyd.auth import policy
from notifyd.auth.identity import Identity
from notifyd.realtime.roomname import dm_name
from tests.helpers import Api

ROOT = Path(__file__).resolve().parent.parent
TENANT = "TEN-0001"
USER = Identity(TENANT, "user-1", "user")
SERVICE = Identity(TENANT, "svc", "service")
ADMIN = Identity(TENANT, "adm", "admin")


def role_comparisons(source: str) -> list[int]:
    """Lines that decide by role: `x.role` compared with anything, or `x.is_privileged`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "role" for s in sides):
                found.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "is_privileged":
            found.append(node.lineno)
    return found


def test_no_handler_decides_a_permission_by_role_itself() -> None:
    deciding = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "notifyd" / "http").glob("*.py"))
        if (lines := role_comparisons(path.read_text()))
    }
    assert deciding == {}, "ask notifyd.auth.policy instead"


def test_each_decision_role_by_role() -> None:
    table = {
        "acts_for_tenant": lambda who: policy.acts_for_tenant(who),
        "only_own": lambda who: policy.only_own(who),
        "may_send_critical": lambda who: policy.may_send_critical(who),
        "may_requeue": lambda who: policy.may_requeue(who),
        "may_manage_reminders": lambda who: policy.may_manage_reminders(who),
        "may_read_templates": lambda who: policy.may_read_templates(who),
        "may_write_templates": lambda who: policy.may_write_templates(who),
        "may_manage_tenant_settings": lambda who: policy.may_manage_tenant_settings(who),
        "may_read_audit": lambda who: policy.may_read_audit(who),
        "may_manage_suppressions": lambda who: policy.may_manage_suppressions(who),
        "may_enter_any_group_room": lambda who: policy.may_enter_any_room(who, dm=False),
        "may_enter_any_dm_room": lambda who: policy.may_enter_any_room(who, dm=True),
        "may_manage_room_as_member": lambda who: policy.may_manage_room(who, "member"),
    }
    assert {
        name: [decide(who) for who in (USER, SERVICE, ADMIN)] for name, decide in table.items()
    } == {
        "acts_for_tenant": [False, True, True],
        "only_own": ["user-1", None, None],
        "may_send_critical": [False, True, True],
        "may_requeue": [False, False, True],
        "may_manage_reminders": [False, True, True],
        "may_read_templates": [False, True, True],
        "may_write_templates": [False, False, True],
        "may_manage_tenant_settings": [False, False, True],
        "may_read_audit": [False, False, True],
        "may_manage_suppressions": [False, False, True],
        "may_enter_any_group_room": [False, True, True],
        "may_enter_any_dm_room": [False, False, False],
        "may_manage_room_as_member": [False, True, True],
    }


def test_decisions_that_depend_on_the_row() -> None:
    # an owner manages its room; anyone may leave; removing another is managing
    assert policy.may_manage_room(USER, "owner")
    assert not policy.may_manage_room(USER, None)
    assert policy.may_remove_member(USER, "member", USER.user_id)
    assert not policy.may_remove_member(USER, "member", "user-2")
    assert policy.may_remove_member(USER, "owner", "user-2")
    # a user sees what it is involved in; a service or admin, everything of its tenant
    assert policy.may_view_reminder(USER, ("cand", "user-1", "svc"))
    assert not policy.may_view_reminder(USER, ("cand", "emp", "svc"))
    assert policy.may_view_reminder(SERVICE, ("cand", "emp", "other-svc"))
    assert policy.may_change_reminder(USER, "svc", "user-1")
    assert not policy.may_change_reminder(USER, "svc", "emp")
    assert policy.may_view_notification(USER, "user-1", "svc")
    assert not policy.may_view_notification(USER, "user-2", "svc")
    assert policy.may_view_notification(ADMIN, "user-2", "svc")
    # a notification socket is its owner's only, whatever the role
    assert policy.may_watch_feed(USER, TENANT, "user-1")
    assert not policy.may_watch_feed(ADMIN, TENANT, "user-1")
    assert not policy.may_watch_feed(USER, "TEN-OTHER", "user-1")
    # the send policy is a setting
    sends = {"user": frozenset({"in_app"}), "service": frozenset({"in_app", "email"})}
    assert policy.may_send(USER, "in_app", sends)
    assert not policy.may_send(USER, "email", sends)
    assert policy.may_send(SERVICE, "email", sends)
    assert not policy.may_send(ADMIN, "in_app", sends)


async def test_a_user_token_may_not_send_a_critical_notification(
    api: Api, db: asyncpg.Connection
) -> None:
    """`critical` bypasses the recipient's opt-outs: 403 for a browser-held token, nothing
    stored; the same send from a service is accepted."""
    send = {"notification_type": "in_app", "recipient": "user-2", "message": "x", "critical": True}
    status, body, _ = await api.post("/notifications/send/", send, user="user-1", role="user")
    assert (status, body["status"]) == (403, 403), body
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    status, body, _ = await api.post("/notifications/send/", send, user="svc", role="service")
    assert status == 202, body


@pytest.mark.parametrize("role", ["service", "admin"])
async def test_a_service_or_admin_enters_any_group_room_but_no_one_elses_dm(
    daemon: Daemon, api: Api, role: str
) -> None:
    status, room, _ = await api.post(
        "/rooms/", {"name": "panel-7", "members": ["bob"]}, tenant=TENANT, user="alice"
    )
    assert status == 201, room
    status, body, _ = await api.get("/rooms/panel-7/", tenant=TENANT, user="ops", role=role)
    assert status == 200, body
    assert {m["user_id"] for m in body["members"]} == {"alice", "bob"}
    dm = dm_name("alice", "bob")
    status, body, _ = await api.get(f"/rooms/{dm}/messages/", tenant=TENANT, user="ops", role=role)
    assert (status, body["status"]) == (403, 403), body
