"""The OpenAPI 3.1 document describing every route, served at `/openapi.json`.

The payloads' schemas are generated from the models the server validates with
(`notifyd.schemas`, built from the daemon's settings, so a limit that is a setting shows its
configured value); what stays written here is the routes: paths, parameters, responses and
security. A test checks that this document and the router agree route for route.
(Resources not yet moved to a model keep a hand-written schema in `SCHEMAS`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from notifyd import __version__
from notifyd.http import idempotency
from notifyd.http.context import SERVICES
from notifyd.http.recipients import ME
from notifyd.http.ui import openapi_paths as ui_paths
from notifyd.payloads import dumps
from notifyd.schemas.fields import TEMPLATE_KEY_PATTERN, anchored
from notifyd.schemas.registry import RESPONSES, Schemas
from notifyd.schemas.tenant_config import document_model
from notifyd.schemas.workflows import RUNS, WORKFLOW_KEY_PATTERN
from notifyd.settings import CHANNELS, Settings

JSON = "application/json"
PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": _ref(schema)}}}


def _ok(
    schema: dict[str, Any], description: str = "OK", headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def _problems(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or a bad header",
        401: "Missing or invalid bearer token",
        403: "The caller's role may not do this",
        404: "No such resource in the caller's tenant",
        409: "Conflicting state or a request with the same Idempotency-Key in flight",
        413: "Body larger than the limit",
        415: "Body is not JSON",
        422: "Invalid fields (see errors[]). Two 422s answer requests this document allows: "
        "type urn:notifyd:problem:unsendable, a request the tenant's state or the caller's role "
        "cannot serve (no such template, a number that is not one in the tenant's region, an "
        "email template without a subject, a template that cannot render with the context, a full "
        "room, a new Twilio account without a token, an SMTP relay the egress policy refuses) or "
        "that only a rule this document cannot state refuses (a reminder whose interview is past "
        "or whose reminder time is not before it, the stored time standing for one a reschedule "
        "leaves out; a workflow's empty quiet window; a trigger's send_at beyond "
        "NOTIFYD_WORKFLOW_MAX_DELAY or its data holding a NUL character): with other faults these "
        "are named in the validation 422; "
        "urn:notifyd:problem:idempotency-key-reused, an Idempotency-Key "
        "sent before with another request",
        429: "A send rate or daily quota said no (`limit` names which; nothing was stored): "
        "retry after Retry-After seconds",
        503: "PostgreSQL or Redis did not answer in time or cannot be reached; or type "
        "urn:notifyd:problem:tenant-config-unavailable, the tenant's configuration source "
        "(NOTIFYD_TENANT_CONFIG_URL) has not yet answered a document notifyd accepts for this "
        "tenant, so nothing is sent with settings or templates it may override (Retry-After)",
    }
    answers: dict[str, Any] = {
        str(code): {"description": text[code], "content": {PROBLEM: {"schema": _ref("Problem")}}}
        for code in codes
    }
    if 429 in codes:
        answers["429"]["headers"] = {
            "Retry-After": {
                "schema": {"type": "integer", "minimum": 1},
                "description": "Whole seconds until the limit can allow a send again",
            }
        }
    return answers


_ID = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "description": "An opaque id from another service (bounded length and character set).",
}
_TIME = {"type": "string", "format": "date-time"}
_LINK = {"Link": {"schema": {"type": "string"}, "description": 'rel="next" page, when full'}}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "schema": {"type": "string", "pattern": anchored(idempotency.KEY.pattern)},
    "description": "Replays the first response for 24 h.",
}
_PATH_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TEMPLATE_PATH: list[dict[str, Any]] = [
    {
        "name": "template_key",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": TEMPLATE_KEY_PATTERN},
    },
    {"name": "channel", "in": "path", "required": True, "schema": {"enum": list(CHANNELS)}},
]

_WORKFLOW_KEY: dict[str, Any] = {
    "name": "workflow_key",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": WORKFLOW_KEY_PATTERN},
}
_NOT_RUNS: dict[
    str, Any
] = {  # GET /workflows/runs/ lists the runs; any other method on that key: 422
    **_WORKFLOW_KEY,
    "schema": {**_WORKFLOW_KEY["schema"], "not": {"const": RUNS}},
    "description": f"{RUNS} names the runs: not a workflow's key",
}

REF_TEMPLATE = "#/components/schemas/{model}"


def generated(schemas: Schemas, read: Sequence[type[BaseModel]] = ()) -> dict[str, Any]:
    """The models' JSON Schemas, by model name: requests as validated, answers as written;
    `read`: documents notifyd reads from other services, as validated (`TenantConfigDocument`,
    what an auth service serves at NOTIFYD_TENANT_CONFIG_URL)."""
    models: list[tuple[type[BaseModel], Any]] = [(m, "validation") for m in schemas.requests()]
    models += [(m, "serialization") for m in RESPONSES]
    models += [(m, "validation") for m in read]
    _, top = models_json_schema(models, ref_template=REF_TEMPLATE)
    found: dict[str, Any] = top.get("$defs", {})
    return found


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """A query model's fields as OpenAPI parameters (in: query)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    required = set(schema.get("required", []))
    parameters = []
    for name, field in schema["properties"].items():
        # a query string has no null: an optional parameter is one left out
        options = [o for o in field.pop("anyOf", []) if o != {"type": "null"}]
        if len(options) == 1:
            field.update(options[0])
        if field.get("default", 0) is None:
            del field["default"]
        parameter: dict[str, Any] = {"name": name, "in": "query", "schema": field}
        if "description" in field:
            parameter["description"] = field["description"]
        if name in required:
            parameter["required"] = True
        parameters.append(parameter)
    return parameters


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "limit": {
                "enum": ["caller", "tenant", "email_daily", "sms_daily", "unsubscribe"],
                "description": "On a 429: the limit that refused (docs/limits.md)",
            },
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
}


def _id_rule(schemas: Schemas) -> dict[str, Any]:
    """The opaque id rule (the configured length and pattern), as the models state it."""
    schema: dict[str, Any] = schemas.message_send.model.model_json_schema()["properties"][
        "receiver_id"
    ]
    schema.pop("title", None)  # "Receiver Id": not this parameter's name
    return schema


def _operations(schemas: Schemas) -> dict[str, dict[str, Any]]:
    """Path → method → operation, for the seed paths; `/api/...` aliases are added below."""
    template_item = [*_TEMPLATE_PATH, *query_parameters(schemas.template_item_query.model)]
    user_id = {"name": "user_id", "in": "path", "required": True, "schema": _id_rule(schemas)}
    not_me = {  # /recipients/me/ answers GET (and PATCH) itself; PUT and DELETE of it: 422
        **user_id,
        "schema": {**_id_rule(schemas), "not": {"const": ME}},
        "description": f"{ME} names the caller: /recipients/{ME}/",
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    auth_errors = _problems(401, 503)  # every authenticated route reads PostgreSQL
    write_errors = _problems(400, 401, 409, 413, 415, 422)

    def op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {
            "summary": summary,
            "security": secured,
            "responses": {**responses, **auth_errors},
            **extra,
        }

    def listing(summary: str, schema: str, query: type[BaseModel], *refused: int) -> dict[str, Any]:
        """A GET of a page of `schema`s, newest first: the query's parameters, a Link to the
        next page; `refused`, the statuses beside 422."""
        return op(
            summary,
            {"200": _ok(_list_of(schema), headers=_LINK), **_problems(*refused, 422)},
            parameters=query_parameters(query),
        )

    def post(
        summary: str,
        answer: tuple[str, str, str],
        body: str,
        *refused: int,
        path: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A POST that does what its body asks (Idempotency-Key replays it): answer is
        (status, schema, description); `refused`, the statuses beside the write errors."""
        status, schema, described = answer
        return op(
            summary,
            {status: _ok(_ref(schema), described), **write_errors, **_problems(*refused)},
            requestBody=_body(body),
            parameters=[*([path] if path else []), _IDEMPOTENCY],
        )

    def item(
        answer: str,
        *,
        put: tuple[str, str, dict[str, Any]],
        get: tuple[str, dict[str, Any]],
        delete: tuple[str, dict[str, Any]],
        full: bool = False,
    ) -> dict[str, Any]:
        """A resource stored under its key in the path: PUT replaces it, GET reads it, DELETE
        removes it; (summary, [body,] path parameter) each."""
        refused = (400, 403, 409, 413, 415, 422) if full else (400, 403, 413, 415, 422)
        return {
            "put": op(
                put[0],
                {"200": _ok(_ref(answer)), **_problems(*refused)},
                requestBody=_body(put[1]),
                parameters=[put[2]],
            ),
            "get": op(
                get[0], {"200": _ok(_ref(answer)), **_problems(403, 404, 422)}, parameters=[get[1]]
            ),
            "delete": op(
                delete[0],
                {"204": {"description": "Deleted"}, **_problems(403, 404, 422)},
                parameters=[delete[1]],
            ),
        }

    return {
        "/notifications/send/": {
            "post": post(
                "Send a notification (email, sms or in_app)",
                ("202", "NotificationAccepted", "Stored and queued"),
                "NotificationSend",
                403,
                429,
            )
        },
        "/notifications/": {
            "get": op(
                "The caller's notifications, newest first",
                {
                    "200": _ok(
                        _list_of("Notification"),
                        headers={**_LINK, "X-Unread-Count": {"schema": {"type": "integer"}}},
                    ),
                    **_problems(422),
                },
                parameters=query_parameters(schemas.notification_query.model),
            )
        },
        "/notifications/mark-as-read/": {
            "post": post(
                "Mark the caller's notifications read",
                ("200", "NotificationsMarkedRead", "OK"),
                "MarkRead",
            )
        },
        "/notifications/{id}/": {
            "get": op(
                "One notification with its delivery status",
                {"200": _ok(_ref("Notification")), **_problems(404)},
                parameters=[_PATH_ID],
            )
        },
        "/messages/send/": {
            "post": post(
                "Send a 1-on-1 message", ("201", "MessageCreated", "Stored"), "MessageSend", 429
            )
        },
        "/messages/": {
            "get": listing(
                "The caller's messages, newest first",
                "Message",
                schemas.message_query.model,
            )
        },
        "/messages/mark-as-read/": {
            "post": post(
                "Mark messages the caller received as read",
                ("200", "MarkReadResult", "OK"),
                "MessageMarkRead",
            )
        },
        "/rooms/": {
            "post": post(
                "Create a group chat room with members",
                ("201", "Room", "Created"),
                "RoomCreate",
                429,
            ),
            "get": listing(
                "The group rooms the caller is a member of, newest first",
                "RoomSummary",
                schemas.page_query.model,
            ),
        },
        **{
            path: {
                "get": op(
                    "The name of the caller's 1-on-1 room with another user (derived, "
                    "never stored: dm.<base64url(id)>.<base64url(id)>, ids sorted)",
                    {"200": _ok(_ref("Room")), **_problems(422)},
                    parameters=[
                        {
                            "name": "other_user_id",
                            "in": "path",
                            "required": True,
                            "schema": _id_rule(schemas),
                        }
                    ],
                )
            }
            for path in ("/rooms/dm/{other_user_id}", "/rooms/dm/{other_user_id}/")
        },
        "/rooms/{room}/": {
            "get": op(
                "A room and its members (members, and tenant admins for group rooms)",
                {"200": _ok(_ref("Room")), **_problems(403, 404)},
                parameters=[
                    {"name": "room", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        },
        "/rooms/{room}/messages/": {
            "get": op(
                "A room's messages, newest first: what a client refetches after a gap",
                {"200": _ok(_list_of("Message"), headers=_LINK), **_problems(403, 404, 422)},
                parameters=[
                    {"name": "room", "in": "path", "required": True, "schema": {"type": "string"}},
                    *query_parameters(schemas.page_query.model),
                ],
            )
        },
        "/rooms/{room}/members/": {
            "post": op(
                "Add members to a group room (owners and tenant admins)",
                {"200": _ok(_ref("RoomMembersAdded")), **_problems(403, 404), **write_errors},
                requestBody=_body("RoomMembersAdd"),
                parameters=[
                    {"name": "room", "in": "path", "required": True, "schema": {"type": "string"}},
                    _IDEMPOTENCY,
                ],
            )
        },
        "/rooms/{room}/members/{user_id}/": {
            "delete": op(
                "Remove a member (owners and tenant admins), or leave (oneself); the removed "
                "user's open sockets in the room close with 4003",
                {"204": {"description": "Removed"}, **_problems(403, 404)},
                parameters=[
                    {"name": "room", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "user_id", "in": "path", "required": True, "schema": _ID},
                ],
            )
        },
        "/reminders/create/": {
            "post": post(
                "Schedule an interview reminder (service or admin)",
                ("201", "Reminder", "Scheduled"),
                "ReminderCreate",
                403,
                429,
            )
        },
        "/reminders/": {
            "get": listing(
                "Reminders where the caller is candidate, employer or creator (all for services)",
                "Reminder",
                schemas.reminder_query.model,
            )
        },
        "/reminders/{id}/": {
            "get": op(
                "One reminder",
                {"200": _ok(_ref("Reminder")), **_problems(404)},
                parameters=[_PATH_ID],
            ),
            "patch": op(
                "Reschedule a reminder that has not fired",
                {"200": _ok(_ref("Reminder")), **_problems(403, 404), **write_errors},
                requestBody=_body("ReminderPatch"),
                parameters=[_PATH_ID],
            ),
            "delete": op(
                "Cancel a reminder that has not fired",
                {"204": {"description": "Cancelled"}, **_problems(403, 404, 409)},
                parameters=[_PATH_ID],
            ),
        },
        "/tenants/current/settings/": {
            "get": op(
                "The tenant's delivery settings (admin; secrets never returned)",
                {"200": _ok(_ref("TenantSettings")), **_problems(403, 503)},
            ),
            "put": op(
                "Change the tenant's delivery settings (admin)",
                {
                    "200": _ok(_ref("TenantSettings")),
                    **_problems(400, 403, 409, 413, 415, 422, 503),
                },
                requestBody=_body("TenantSettings"),
            ),
        },
        "/preferences/": {
            "get": op("The caller's notification preferences", {"200": _ok(_ref("Preferences"))}),
            "put": op(
                "Replace the caller's notification preferences",
                {"200": _ok(_ref("Preferences")), **_problems(400, 413, 415, 422)},
                requestBody=_body("Preferences"),
            ),
        },
        "/notifications/{id}/retry/": {
            "post": op(
                "Requeue a failed delivery with fresh attempts (admin)",
                {"202": _ok(_ref("Notification"), "Requeued"), **_problems(400, 403, 404, 409)},
                parameters=[_PATH_ID, _IDEMPOTENCY],
            )
        },
        "/templates/": {
            "get": listing(
                "The tenant's templates (admin, service)",
                "Template",
                schemas.template_query.model,
                403,
            )
        },
        "/templates/preview/": {
            "post": op(
                "Render a stored template or a draft with a sample context (admin, service)",
                {"200": _ok(_ref("Rendered")), **_problems(403, 503), **write_errors},
                requestBody=_body("TemplatePreview"),
            )
        },
        "/templates/{template_key}/{channel}/": {
            "get": op(
                "One template",
                {"200": _ok(_ref("Template")), **_problems(403, 404, 422)},
                parameters=template_item,
            ),
            "put": op(
                "Create or replace a template (admin); it must compile",
                {"200": _ok(_ref("Template")), **_problems(403, 503), **write_errors},
                requestBody=_body("TemplatePut"),
                parameters=_TEMPLATE_PATH,
            ),
            "delete": op(
                "Delete a template (admin)",
                {"204": {"description": "Deleted"}, **_problems(403, 404, 422)},
                parameters=template_item,
            ),
        },
        "/recipients/me/": {
            "get": op(
                "The caller's own recipient (addresses, time zone, locale)",
                {"200": _ok(_ref("Recipient")), **_problems(404)},
            ),
            "patch": op(
                "Change the caller's own time zone and locale (null clears)",
                {"200": _ok(_ref("Recipient")), **_problems(400, 413, 415, 422)},
                requestBody=_body("RecipientOwnPatch"),
            ),
        },
        "/recipients/{user_id}/": item(
            "Recipient",
            put=(
                "Store a user's addresses, time zone, locale and name (service, admin); "
                "replaces the whole recipient",
                "RecipientPut",
                not_me,
            ),
            get=("A user's recipient (service, admin)", user_id),
            delete=("Delete a user's recipient (service, admin)", not_me),
        ),
        "/workflows/": {
            "get": op(
                "The tenant's workflows (service, admin), by key",
                {"200": _ok(_list_of("Workflow")), **_problems(403)},
            )
        },
        "/workflows/{workflow_key}/": item(
            "Workflow",
            put=(
                "Define or replace a workflow (admin); runs already started keep theirs",
                "WorkflowDefinition",
                _NOT_RUNS,
            ),
            get=("One workflow (service, admin)", _WORKFLOW_KEY),
            delete=("Delete a workflow (admin); runs already started go on", _NOT_RUNS),
            full=True,  # NOTIFYD_WORKFLOWS_PER_TENANT: 409
        ),
        "/workflows/{workflow_key}/trigger/": {
            "post": post(
                "Start the workflow for each recipient (service, admin): one run each",
                ("202", "WorkflowTriggered", "Accepted"),
                "WorkflowTrigger",
                403,
                404,
                429,
                path=_NOT_RUNS,
            )
        },
        "/workflows/{workflow_key}/cancel/": {
            "post": op(
                "Cancel every step not yet sent of the runs with this cancel_key (service, "
                "admin): none of them is sent after the answer",
                {"200": _ok(_ref("WorkflowCancelled")), **write_errors, **_problems(403)},
                requestBody=_body("WorkflowCancel"),
                parameters=[_NOT_RUNS, _IDEMPOTENCY],
            )
        },
        "/workflows/runs/": {
            "get": listing(
                "Workflow runs, newest first, with their steps (a user: their own)",
                "WorkflowRun",
                schemas.run_query.model,
                403,
            )
        },
        "/workflows/runs/{run_id}/": {
            "get": op(
                "One workflow run and each of its steps",
                {"200": _ok(_ref("WorkflowRun")), **_problems(404)},
                parameters=[
                    {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
            )
        },
        "/webhooks/endpoints/": {
            "post": op(
                "Add a webhook endpoint (admin); the answer holds its secret, shown this once "
                "(Idempotency-Key is ignored here: the answer would be stored with the secret)",
                {
                    "201": _ok(
                        _ref("WebhookEndpointWithSecret"),
                        "Created",
                        headers={"Location": {"schema": {"type": "string"}}},
                    ),
                    **_problems(403),
                    **write_errors,
                },
                requestBody=_body("WebhookEndpointCreate"),
            ),
            "get": op(
                "The tenant's webhook endpoints (admin)",
                {"200": _ok(_list_of("WebhookEndpoint")), **_problems(403)},
            ),
        },
        "/webhooks/endpoints/{id}/": {
            "get": op(
                "One webhook endpoint (admin)",
                {"200": _ok(_ref("WebhookEndpoint")), **_problems(403, 404)},
                parameters=[_PATH_ID],
            ),
            "patch": op(
                "Change a webhook endpoint's URL, events, description, or turn it on or off "
                "(admin)",
                {
                    "200": _ok(_ref("WebhookEndpoint")),
                    **_problems(403, 404),
                    **_problems(400, 413, 415, 422),
                },
                requestBody=_body("WebhookEndpointPatch"),
                parameters=[_PATH_ID],
            ),
            "delete": op(
                "Delete a webhook endpoint and its deliveries (admin)",
                {"204": {"description": "Deleted"}, **_problems(403, 404)},
                parameters=[_PATH_ID],
            ),
        },
        "/webhooks/endpoints/{id}/rotate-secret/": {
            "post": op(
                "A new secret for a webhook endpoint, shown this once (admin); the old one "
                "keeps signing beside it for NOTIFYD_WEBHOOK_SECRET_OVERLAP",
                {
                    "200": _ok(_ref("WebhookEndpointWithSecret")),
                    **_problems(403, 404, 409),
                },
                parameters=[_PATH_ID],
            )
        },
        "/webhooks/endpoints/{id}/deliveries/": {
            "get": op(
                "An endpoint's deliveries, newest first, with their attempts (admin)",
                {
                    "200": _ok(_list_of("WebhookDelivery"), headers=_LINK),
                    **_problems(403, 404, 422),
                },
                parameters=[_PATH_ID, *query_parameters(schemas.page_query.model)],
            )
        },
        "/webhooks/endpoints/{id}/deliveries/{delivery_id}/replay/": {
            "post": op(
                "Send a delivery again, with the same webhook-id and a new retry window (admin)",
                {
                    "202": _ok(_ref("WebhookDelivery"), "Queued"),
                    **_problems(400, 403, 404, 409, 422),
                },
                parameters=[
                    _PATH_ID,
                    {
                        "name": "delivery_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    _IDEMPOTENCY,
                ],
            )
        },
        "/suppressions/": {
            "get": op(
                "The tenant's suppression list, newest first (admin)",
                {"200": _ok(_list_of("Suppression"), headers=_LINK), **_problems(403, 422)},
                parameters=query_parameters(schemas.page_query.model),
            )
        },
        "/suppressions/{channel}/{address}/": {
            "delete": op(
                "Take an address off the suppression list, every category (admin): it may be "
                "sent to again",
                {"204": {"description": "Removed"}, **_problems(403, 404, 422)},
                parameters=[
                    {
                        "name": "channel",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "enum": ["email", "sms"]},
                    },
                    {
                        "name": "address",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 320},
                    },
                ],
            )
        },
        "/audit/": {
            "get": listing(
                "The tenant's audit log (admin)",
                "AuditEntry",
                schemas.audit_query.model,
                403,
            )
        },
    }


_LINE_TOO_LONG = {
    "description": "A request line over 8,190 bytes (a token far longer than any notifyd "
    "signs), answered in plain text by the HTTP server before notifyd reads the request",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
_TOKEN = {
    "name": "token",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]+[.][A-Za-z0-9_-]+$", "maxLength": 1024},
}


def _socket(summary: str, path: dict[str, Any], since: str) -> dict[str, Any]:
    """A WebSocket upgrade: its path parameters, the token and the `since` offset."""
    return {
        "summary": summary,
        "security": [],
        "parameters": [
            *(
                {"name": name, "in": "path", "required": True, "schema": schema}
                for name, schema in path.items()
            ),
            {"name": "token", "in": "query", "schema": {"type": "string"}},
            {"name": "since", "in": "query", "schema": {"type": "string"}, "description": since},
        ],
        "responses": {"101": {"description": "Switching protocols"}, **_problems(403)},
    }


def _public(schemas: Schemas) -> dict[str, dict[str, Any]]:
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "/healthz": {
            "get": {"summary": "Alive", "security": [], "responses": {"200": _ok(status)}}
        },
        "/readyz": {
            "get": {
                "summary": "Ready: PostgreSQL, Redis and actors",
                "security": [],
                "responses": {"200": _ok(status), "503": _ok(status, "Not ready")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/unsubscribe/{token}": {
            "get": {
                "summary": "One-click unsubscribe (RFC 8058): a small HTML page whose one "
                "button POSTs the opt-out. The signed token is the credential; a forged or "
                "altered one is 404",
                "security": [],
                "parameters": [_TOKEN],
                "responses": {
                    "200": {
                        "description": "The page",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_problems(404, 429),
                    "400": _LINE_TOO_LONG,
                },
            },
            "post": {
                "summary": "One-click unsubscribe as a mailbox provider sends it (form body "
                "List-Unsubscribe=One-Click): the recipient's preference for the category "
                "(a suppression-list entry when the email named no user)",
                "security": [],
                "parameters": [_TOKEN],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {
                            "schema": {
                                "type": "object",
                                "required": ["List-Unsubscribe"],
                                "properties": {
                                    "List-Unsubscribe": {"type": "string", "const": "One-Click"}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "Unsubscribed (or already)",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_problems(404, 413, 415, 422, 429),
                    "400": _LINE_TOO_LONG,
                },
            },
        },
        "/ws/notifications/{tenant_id}/{user_id}/": {
            "get": _socket(
                "WebSocket: the user's live notifications and unread count; accepts "
                "mark_read and refresh {token}. Token: Authorization header, "
                "Sec-WebSocket-Protocol `bearer, <token>`, or ?token=. Closes 4001 (token bad, "
                "or expired without a refresh), 4003 (not your channel), 4008 (too slow), 4029 "
                "(the user or tenant has its most sockets open), 1001 "
                "(server going away).",
                {"tenant_id": _ID, "user_id": _ID},
                "Offset of the last event seen: replay what was missed "
                "(or a `gap` frame when some of it is no longer kept).",
            )
        },
        "/ws/chat/{room}/": {
            "get": _socket(
                "WebSocket: a chat room, live. Send {message, receiver_id?, "
                "client_id?}, {type: typing}, {type: read, up_to}, {type: ping}, {type: "
                "refresh, token}; receive message, read, typing, join/leave and a first "
                "presence frame. Token as for the notifications socket. Closes 4001 (token bad, "
                "or expired without a refresh), 4003 (not a member), 4004 (no such room), 4008 "
                "(too slow), 4029 (the user or tenant has its most sockets open), 1001 (server "
                "going away).",
                {"room": {"type": "string"}},
                "Offset of the last room event seen: replay what was "
                "missed (or a `gap` frame: refetch GET /rooms/{room}/messages/).",
            )
        },
        "/webhooks/twilio/status": {
            "post": {
                "summary": "Twilio message status callback (X-Twilio-Signature over the URL "
                "and the form; the query names the tenant and the notification)",
                "security": [],
                "parameters": [
                    *query_parameters(schemas.twilio_status_query.model),
                    {
                        "name": "X-Twilio-Signature",
                        "in": "header",
                        "schema": {"type": "string"},
                        "description": "Missing or not the account's: 403",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-www-form-urlencoded": {"schema": _ref("TwilioStatus")}
                    },
                },
                "responses": {"204": {"description": "Accepted"}, **_problems(400, 403, 415)},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _ok({"type": "object"})},
            }
        },
        **ui_paths(),
    }


def build_document(settings: Settings | None = None) -> dict[str, Any]:
    """The document for a daemon with `settings` (the defaults when None)."""
    settings = settings or Settings()
    schemas = Schemas.build(settings)
    paths: dict[str, Any] = {}
    for path, operations in _operations(schemas).items():
        paths[path] = operations
        alias = "/api" + path
        paths[alias] = {
            method: {**operation, "operationId": f"{method}_api{_slug(path)}"}
            for method, operation in operations.items()
        }
        for method, operation in operations.items():
            operation["operationId"] = f"{method}{_slug(path)}"
    for path, operations in _public(schemas).items():
        for method, operation in operations.items():
            operation["operationId"] = f"{method}{_slug(path)}"
        paths[path] = operations
    seen: set[str] = set()
    for operations in paths.values():
        for operation in operations.values():
            # `/rooms/dm/{id}` and `/rooms/dm/{id}/` both exist and slug alike
            while operation["operationId"] in seen:
                operation["operationId"] += "_unslashed"
            seen.add(operation["operationId"])
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "notifyd",
            "version": __version__,
            "description": "Notifications, messages, reminders and real-time chat for "
            "multi-tenant SaaS. Every error is application/problem+json. "
            "With NOTIFYD_TENANT_CONFIG_URL set, notifyd reads each tenant's SMTP relay, "
            "Twilio account, defaults and templates from the team's auth service, which "
            "answers `GET <url with {tenant_id}>` (bearer NOTIFYD_TENANT_CONFIG_TOKEN, "
            "If-None-Match) with the schema `TenantConfigDocument` (200, with an ETag), 304, "
            "or 404 for a tenant it configures nothing for.",
        },
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, **generated(schemas, [document_model(settings)])},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }


def _slug(path: str) -> str:
    """`/notifications/{id}/` → `_notifications_id`, for stable operation ids."""
    parts = [p.strip("{}").replace("-", "_").replace(".", "_") for p in path.split("/") if p]
    return "_" + "_".join(parts)


def add_routes(app: web.Application) -> None:
    document = dumps(build_document(app[SERVICES].settings))  # built once, at start-up

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type=JSON)

    app.router.add_get("/openapi.json", openapi_json)
