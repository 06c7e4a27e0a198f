"""Accepting a notification: the one path from "someone wants this sent" to the outbox.

The REST send route (`http/notifications.py`), `notifyd send` (`operator/send.py`), event
ingestion (`ingest/accept.py`) and a workflow's step (`actors/workflow_firer.py`) take the same
steps, each from the one module that owns it, so a smoke test from the shell or an ingested
event is checked, rendered and stored exactly as a POST is:

1. `orders`: the `Order` (one notification as asked for) and its field rules,
   `order_problems`: the REST body's model (`schemas.notifications`) for callers whose input is
   not a JSON body; the REST route reads its body into that model itself;
2. `prepare`: SMS numbers to E.164 in the tenant's region and the content rendered now, so a
   number that cannot be read or a template that cannot render is the caller's error (`Refused`),
   never a blank in someone's inbox later;
3. `rows`: the outbox row and its audit row (`new_row`, `authored`), stored in one statement by
   `store.notifications.insert_many_audited`, inside the caller's transaction when it has more
   to write there (an idempotency record, an event's dedupe row, a workflow step's outcome);
4. `outbox`: after the commit, `announce` puts the intents on the stream. If Redis fails there
   the notification is still accepted (the row is committed) and the sweeper enqueues it
   later. REST sends without an Idempotency-Key go through `Outbox` instead, a group commit
   that hands its batches to this process's dispatcher.

Who may send what (the role policy) stays with each entry point: a token's role means nothing
to an operator at a shell. The admin's requeue of a failed delivery is `notifyd.requeue`.
"""
