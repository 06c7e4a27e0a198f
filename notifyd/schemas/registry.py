"""`Schemas`: every payload's reader, built once from the settings when the app is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from notifyd.ids import OpaqueIdRule
from notifyd.schemas import (
    audit,
    contacts,
    messages,
    notifications,
    recipients,
    reminders,
    rooms,
    suppressions,
    templates,
    tenants,
    twilio,
    webhooks,
    workflows,
)
from notifyd.schemas.fields import (
    PATTERN_MESSAGES,
    PageQuery,
    id_pattern_message,
    paged,
    with_ids,
)
from notifyd.schemas.preferences import Preferences  # the field `preferences` is its reader
from notifyd.schemas.reader import Reader
from notifyd.settings import Settings


@dataclass(frozen=True, slots=True)
class Schemas:
    """The readers handlers, the CLI and ingestion validate with, and the models behind them
    (whose JSON Schemas `/openapi.json` publishes)."""

    send: Reader[notifications.NotificationSend]
    mark_read: Reader[notifications.MarkRead]
    notification_query: Reader[notifications.NotificationQuery]
    message_send: Reader[messages.MessageSend]
    message_query: Reader[messages.MessageQuery]
    message_mark_read: Reader[messages.MessageMarkRead]
    chat_post: Reader[messages.ChatPost]
    preferences: Reader[Preferences]
    audit_query: Reader[audit.AuditQuery]
    reminder_create: Reader[reminders.ReminderCreate]
    reminder_patch: Reader[reminders.ReminderPatch]
    reminder_query: Reader[reminders.ReminderQuery]
    page_query: Reader[PageQuery]
    recipient_put: Reader[recipients.RecipientPut]
    recipient_patch: Reader[recipients.RecipientOwnPatch]
    workflow: Reader[workflows.WorkflowDefinition]
    workflow_trigger: Reader[workflows.WorkflowTrigger]
    workflow_cancel: Reader[workflows.WorkflowCancel]
    run_query: Reader[workflows.RunQuery]
    room_create: Reader[rooms.RoomCreate]
    room_members: Reader[rooms.RoomMembersAdd]
    template_put: Reader[templates.TemplatePut]
    template_preview: Reader[templates.TemplatePreview]
    template_query: Reader[templates.TemplateQuery]
    template_item_query: Reader[templates.TemplateItemQuery]
    tenant_settings: Reader[tenants.TenantSettings]
    twilio_status_query: Reader[twilio.TwilioStatusQuery]
    twilio_status: Reader[twilio.TwilioStatus]
    webhook_create: Reader[webhooks.WebhookEndpointCreate]
    webhook_patch: Reader[webhooks.WebhookEndpointPatch]

    @classmethod
    def build(cls, settings: Settings) -> Schemas:
        id_rule = OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern)
        patterns = {
            **PATTERN_MESSAGES,
            **contacts.PATTERN_MESSAGES,
            **workflows.PATTERN_MESSAGES,
            **rooms.PATTERN_MESSAGES,
            **templates.PATTERN_MESSAGES,
            **tenants.PATTERN_MESSAGES,
            **webhooks.PATTERN_MESSAGES,
            **id_pattern_message(settings.id_pattern),
        }

        def send_rules(values: Any, at_fault: Any) -> list[Any]:
            return notifications.send_problems(values, id_rule, at_fault)

        return cls(
            send=Reader(notifications.send_model(settings), patterns, send_rules),
            mark_read=Reader(
                notifications.mark_read_model(settings), patterns, notifications.mark_read_problems
            ),
            notification_query=Reader(paged(notifications.NotificationQuery, settings), patterns),
            message_send=Reader(messages.send_model(settings), patterns),
            message_query=Reader(paged(messages.query_model(settings), settings), patterns),
            message_mark_read=Reader(
                messages.mark_read_model(settings), patterns, messages.mark_read_problems
            ),
            chat_post=Reader(messages.chat_post_model(settings), patterns),
            preferences=Reader(Preferences, patterns),
            audit_query=Reader(
                paged(with_ids(audit.AuditQuery, settings, "user_id"), settings), patterns
            ),
            reminder_create=Reader(
                reminders.create_model(settings), patterns, refusals=reminders.create_refusals
            ),
            reminder_patch=Reader(reminders.ReminderPatch, patterns, reminders.patch_problems),
            reminder_query=Reader(
                paged(with_ids(reminders.ReminderQuery, settings, "application_id"), settings),
                patterns,
            ),
            page_query=Reader(paged(PageQuery, settings), patterns),
            recipient_put=Reader(recipients.RecipientPut, patterns),
            recipient_patch=Reader(recipients.RecipientOwnPatch, patterns),
            workflow=Reader(
                workflows.definition_model(settings),
                patterns,
                workflows.definition_rules(settings.workflow_max_delay),
                workflows.definition_refusals,
            ),
            workflow_trigger=Reader(
                workflows.trigger_model(settings),
                patterns,
                workflows.trigger_rules,
                workflows.trigger_refusals(settings.workflow_max_delay),
            ),
            workflow_cancel=Reader(
                workflows.cancel_model(settings), patterns, workflows.cancel_rules
            ),
            run_query=Reader(
                paged(with_ids(workflows.RunQuery, settings, "recipient"), settings), patterns
            ),
            room_create=Reader(rooms.create_model(settings), patterns),
            room_members=Reader(rooms.add_members_model(settings), patterns),
            template_put=Reader(templates.put_model(settings), patterns),
            template_preview=Reader(
                templates.preview_model(settings), patterns, templates.preview_problems
            ),
            template_query=Reader(paged(templates.TemplateQuery, settings), patterns),
            template_item_query=Reader(templates.TemplateItemQuery, patterns),
            tenant_settings=Reader(tenants.TenantSettings, patterns, tenants.settings_problems),
            twilio_status_query=Reader(twilio.status_query_model(settings), patterns),
            twilio_status=Reader(twilio.TwilioStatus, patterns),
            webhook_create=Reader(webhooks.WebhookEndpointCreate, patterns),
            webhook_patch=Reader(webhooks.WebhookEndpointPatch, patterns),
        )

    def requests(self) -> list[type[BaseModel]]:
        """The request bodies' models, for the document's components."""
        return [
            self.send.model,
            self.mark_read.model,
            self.message_send.model,
            self.message_mark_read.model,
            self.preferences.model,  # also the answer's shape
            self.reminder_create.model,
            self.reminder_patch.model,
            self.recipient_put.model,
            self.recipient_patch.model,
            self.workflow.model,
            self.workflow_trigger.model,
            self.workflow_cancel.model,
            self.room_create.model,
            self.room_members.model,
            self.template_put.model,
            self.template_preview.model,
            self.tenant_settings.model,  # also the answer's shape
            self.twilio_status.model,
            self.webhook_create.model,
            self.webhook_patch.model,
        ]


RESPONSES: list[type[BaseModel]] = [
    notifications.Notification,
    notifications.NotificationAccepted,
    notifications.NotificationsMarkedRead,
    messages.MessageCreated,
    messages.Message,
    messages.MarkReadResult,
    rooms.RoomMember,
    rooms.RoomSummary,
    rooms.Room,
    rooms.RoomMembersAdded,
    reminders.Reminder,
    templates.Template,
    templates.Rendered,
    audit.AuditEntry,
    recipients.Recipient,
    workflows.Workflow,
    workflows.WorkflowTriggered,
    workflows.WorkflowCancelled,
    workflows.WorkflowRun,
    webhooks.WebhookEndpoint,
    webhooks.WebhookEndpointWithSecret,
    webhooks.WebhookDelivery,
    suppressions.Suppression,
]
"""The answers' models, for the document's components (answers are not validated)."""
