"""The shape of every payload notifyd accepts, written once as pydantic models.

Each module holds one resource's models (`notifications`, ...). A model says what a field is
(type, bounds, pattern); the few rules across fields live beside it as a plain function over
its values. The same model validates the REST body, is the source of its JSON Schema in
`/openapi.json` (`notifyd.http.openapi`), and checks the CLI's order, so the three cannot
disagree. Limits that are settings are applied once, when `Schemas.build` runs at start-up
(`registry.py`); nothing here is built per request.
"""
