"""/openapi.json describes exactly the routes the daemon serves."""

from __future__ import annotations

import json
import re
from dataclasses import replace

from notifyd.app import Daemon
from notifyd.http.openapi import build_document
from notifyd.settings import Settings
from tests.helpers import Api


def _served_routes(daemon: Daemon) -> set[tuple[str, str]]:
    assert daemon._runner is not None
    routes = set()
    for route in daemon._runner.app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        routes.add((route.resource.canonical, route.method.lower()))
    return routes


async def test_document_and_router_agree_route_for_route(api: Api, daemon: Daemon) -> None:
    status, document, _ = await api.get("/openapi.json", auth=False)
    assert status == 200
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == _served_routes(daemon)


async def test_every_operation_documents_its_errors_as_problems(api: Api) -> None:
    _, document, _ = await api.get("/openapi.json", auth=False)
    ids = set()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            ids.add(operation["operationId"])
            if operation.get("security") == []:
                continue
            assert "401" in operation["responses"], (path, method)
            problem = operation["responses"]["401"]["content"]
            assert "application/problem+json" in problem
    assert len(ids) == sum(len(ops) for ops in document["paths"].values())


def test_limits_that_are_settings_appear_in_the_document_with_their_value() -> None:
    # one source: the schema the server validates with is the schema the document shows
    settings = replace(
        Settings(), subject_max_length=42, context_max_keys=7, page_size_default=5, page_size_max=9
    )
    schemas = build_document(settings)["components"]["schemas"]
    send = schemas["NotificationSend"]["properties"]
    assert send["subject"]["anyOf"][0]["maxLength"] == 42
    assert send["context"]["anyOf"][0]["maxProperties"] == 7
    assert {"category", "critical", "locale"} <= set(send)
    listing = build_document(settings)["paths"]["/notifications/"]["get"]["parameters"]
    assert {p["name"]: p["schema"].get("maximum") for p in listing}["limit"] == 9


def test_room_bodies_show_the_configured_member_limit_and_id_rule() -> None:
    settings = replace(Settings(), room_max_members=12, id_max_length=40)
    schemas = build_document(settings)["components"]["schemas"]
    for name in ("RoomCreate", "RoomMembersAdd"):
        members = schemas[name]["properties"]["members"]
        assert members["maxItems"] == 12, name
        assert members["items"]["maxLength"] == 40, name


def test_template_bodies_show_the_configured_lengths_and_the_preview_rule() -> None:
    settings = replace(Settings(), notification_max_length=300, context_max_keys=4)
    schemas = build_document(settings)["components"]["schemas"]
    assert schemas["TemplatePut"]["properties"]["text_body"]["maxLength"] == 300
    preview = schemas["TemplatePreview"]
    assert preview["properties"]["context"]["anyOf"][0]["maxProperties"] == 4
    # a stored template (template_key + channel) or a draft (text_body): exactly one
    assert [branch["required"] for branch in preview["oneOf"]] == [
        ["template_key", "channel"],
        ["text_body"],
    ]


def test_tenant_settings_show_the_rules_the_server_applies() -> None:
    schemas = build_document()["components"]["schemas"]
    number = schemas["TwilioSettings"]["properties"]["from_number"]
    assert number["pattern"].startswith("^") and number["maxLength"] == 40
    assert number["allOf"]  # at least five digits
    assert schemas["SmtpSettings"]["properties"]["port"]["maximum"] == 65535
    assert schemas["SmtpSettings"]["not"]["required"] == ["use_tls", "use_ssl"]


async def test_served_document_is_built_from_the_daemons_settings(api: Api, daemon: Daemon) -> None:
    _, document, _ = await api.get("/openapi.json", auth=False)
    assert document == json.loads(json.dumps(build_document(daemon.settings)))


async def test_a_notification_answer_has_exactly_the_documented_fields(api: Api) -> None:
    status, sent, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-1", "message": "hi", "locale": "en"},
        user="svc",
        role="service",
    )
    assert status == 202, sent
    status, answer, _ = await api.get(f"/notifications/{sent['notification_id']}/")
    assert status == 200, answer
    _, document, _ = await api.get("/openapi.json", auth=False)
    described = document["components"]["schemas"]["Notification"]
    assert set(answer) == set(described["properties"]) == set(described["required"])
    statuses = described["properties"]["status"]["enum"]
    assert {"queued", "dispatched", "retrying", "suppressed"} <= set(statuses)


def test_the_contact_rule_is_in_the_document_once_for_reminders_and_recipients() -> None:
    settings = replace(Settings(), id_max_length=40)
    schemas = build_document(settings)["components"]["schemas"]
    contact = schemas["Contact"]["properties"]
    zones = contact["timezone"]["anyOf"][0]["enum"]
    assert "Europe/Berlin" in zones and "UTC" in zones and "Mars/Olympus" not in zones
    assert contact["email"]["anyOf"][0]["maxLength"] == 254
    assert schemas["RecipientPut"]["properties"] == schemas["Contact"]["properties"]
    create = schemas["ReminderCreate"]
    assert create["properties"]["candidate_contact"]["anyOf"][0]["$ref"].endswith("/Contact")
    assert create["properties"]["application_id"]["maxLength"] == 40
    assert create["properties"]["interview_time"]["format"] == "date-time"
    assert schemas["ReminderPatch"]["anyOf"]  # one time at least
    assert schemas["RecipientOwnPatch"]["properties"]["timezone"]["anyOf"][0]["enum"] == zones


def test_the_twilio_callback_documents_its_query_and_form() -> None:
    document = build_document()
    operation = document["paths"]["/webhooks/twilio/status"]["post"]
    query = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}
    assert query["notification"]["schema"]["format"] == "uuid"
    assert query["tenant"]["schema"]["pattern"].startswith("^")
    form = operation["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    status = document["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    assert status["required"] == ["MessageSid", "MessageStatus"]
    assert status["additionalProperties"] is True  # Twilio sends more, all of it signed


def test_a_workflows_durations_show_the_configured_bound() -> None:
    settings = replace(Settings(), workflow_max_delay=7200.0)
    definition = build_document(settings)["components"]["schemas"]["WorkflowDefinition"]
    delay = definition["allOf"][0]["properties"]["steps"]["items"]["properties"]["delay"]
    within = re.compile(delay["pattern"])
    assert all(within.match(d) for d in ("1s", "7200s", "120m", "2h"))
    assert not any(within.match(d) for d in ("7201s", "121m", "3h", "1d", "0s"))


def test_the_workflow_rules_a_schema_cannot_state_are_said_where_the_field_is() -> None:
    # the readers' refusals (a 422 `unsendable` alone): a client reading the document learns
    # them at the field, with the configured bound
    settings = replace(Settings(), workflow_max_delay=7200.0)
    schemas = build_document(settings)["components"]["schemas"]
    trigger = schemas["WorkflowTrigger"]["properties"]
    assert "at most 7200 s ahead" in trigger["send_at"]["description"]
    assert "NUL" in trigger["data"]["description"]
    assert "not the same time as start" in schemas["QuietHours"]["properties"]["end"]["description"]


async def test_a_rooms_answers_have_exactly_the_documented_fields(api: Api) -> None:
    _, document, _ = await api.get("/openapi.json", auth=False)
    schemas = document["components"]["schemas"]
    mapping = schemas["Room"]["discriminator"]["mapping"]
    status, group, _ = await api.post("/rooms/", {"name": "team", "members": ["bob"]}, user="ann")
    assert status == 201, group
    status, again, _ = await api.get("/rooms/team/", user="ann")
    assert status == 200 and again == group
    status, dm, _ = await api.get("/rooms/dm/bob/", user="ann")
    assert status == 200, dm
    for answer in (group, dm):
        described = schemas[mapping[answer["kind"]].rsplit("/", 1)[1]]
        assert set(answer) == set(described["properties"]) == set(described["required"])
    member = schemas["RoomMember"]
    assert set(group["members"][0]) == set(member["properties"]) == set(member["required"])
