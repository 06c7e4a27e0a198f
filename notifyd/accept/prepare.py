"""An order made ready to store: its recipient normalised, its content rendered now."""

from __future__ import annotations

from dataclasses import dataclass

from notifyd.accept.orders import Order, Refused
from notifyd.compose import Composer, render_limits
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.providers.render import Rendered, TemplateError
from notifyd.schemas.errors import FieldError
from notifyd.settings import Settings
from notifyd.store.pool import Executor
from notifyd.store.tenants import TenantSettings, locale_for, region_for


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Prepared:
    """An order that passed every check: recipient normalised, content rendered."""

    order: Order
    recipient: str
    rendered: Rendered


async def prepare(
    executor: Executor,
    settings: Settings,
    tenant: TenantSettings,
    tenant_id: str,
    order: Order,
    *,
    composer: Composer | None = None,
) -> Prepared:
    """Normalise the recipient and render the content; `Refused` names the field at fault.

    Only the tenant's region and default locale are used, so `tenant` may be the redacted
    settings (`store.tenants.load_redacted`): nothing here needs a tenant's secrets.
    `composer`: one shared by a batch of orders (each distinct template resolved once; it
    must know the tenant's default locale as `locale_for` gives it).
    """
    recipient = order.recipient.strip()
    if order.channel == "sms":
        # read national forms in the tenant's region now: the row holds the E.164 form the
        # provider and the status callbacks use
        try:
            recipient = to_e164(recipient, region_for(tenant, settings))
        except InvalidPhone as exc:
            raise Refused([FieldError("recipient", str(exc))]) from None
    try:
        if composer is None:
            composer = Composer(
                executor,
                locale_for(tenant, settings),
                limits=render_limits(settings),
                default_locales={tenant_id: locale_for(tenant, settings)},
                known={tenant_id: tenant},  # its sourced templates win (compose.resolve)
            )
        rendered = await composer.compose(
            tenant_id=tenant_id,
            channel=order.channel,
            template_key=order.template_key,
            context=order.context,
            subject=order.subject,
            message=order.message,
            locale=order.locale,
        )
    except TemplateError as exc:
        raise Refused([FieldError(exc.field, exc.reason)]) from None
    if order.channel == "email" and not (rendered.subject or "").strip():
        raise Refused([FieldError("subject", "is required for email (directly or by template)")])
    return Prepared(order, recipient, rendered)
