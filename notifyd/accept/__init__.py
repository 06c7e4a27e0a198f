"""Accepting a notification: the one path from "someone wants this sent" to the outbox.

REST (`http/notifications.py`), `notifyd send` (`operator/send.py`), ingestion
(`ingest/accept.py`) and workflow steps (`actors/workflow_firer.py`) take the same steps, each
from the one module that owns it, so a send from the shell or an event is checked, rendered
and stored exactly as a POST is:

1. `orders`: the `Order` and its field rules (`order_problems`: the REST body's model, for
   input that is not a JSON body);
2. `prepare`: SMS numbers to E.164 in the tenant's region and the content rendered now, so an
   unreadable number or a template that cannot render is the caller's error (`Refused`);
3. `rows`: the outbox row and its audit row, stored in one statement by
   `store.notifications.insert_many_audited` (in the caller's transaction when it has more);
4. `outbox`: after the commit, `announce` (the intents; a Redis failure leaves the rows to the
   sweeper), or for REST sends without an Idempotency-Key the `Outbox` (a group commit, then
   this process's dispatcher).

The role policy stays with each entry point; an admin's requeue is `notifyd.requeue`.
"""
