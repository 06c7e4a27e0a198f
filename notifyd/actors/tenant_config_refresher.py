"""Keeps the tenant configuration copies in use fresh, so no send waits for a refresh.

A copy is otherwise refreshed by the first read past 80 % of its TTL; a tenant that sends
rarely would then find its copy expired and its send would wait (up to a second) for the
source. This actor runs `TenantConfigs.refresh_due` a few times per TTL's last fifth: every
copy read in the last few TTLs is revalidated (`If-None-Match`, or the version another
instance validated) before it expires.
"""

from __future__ import annotations

import asyncio

from notifyd.supervisor import sleep_or_stop
from notifyd.tenant_config import TenantConfigs


class TenantConfigRefresher:
    name = "tenant_config_refresher"

    def __init__(self, configs: TenantConfigs) -> None:
        self._configs = configs

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._configs.refresh_due()
            if await sleep_or_stop(stop, self._configs.refresh_interval):
                return
