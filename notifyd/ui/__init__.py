"""The web components (`<notifyd-inbox>`, `<notifyd-chat>`): plain ES modules shipped inside
the package (package-data in pyproject.toml) and served by `notifyd.http.ui`.

They are files, not Python: this module only finds them, reads them once and names each
version by its content, so a host page can cache a version for ever (`?v=<version>`) and
still see a new one the moment an upgrade changes a byte. Both components import the shared
`notifyd-core.js`; that import is pinned here to the core's own version, so a component
cached for ever never runs against another version of the core (and a new core makes new
component versions too).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from importlib.resources import files

CORE = "notifyd-core.js"
COMPONENTS = (CORE, "notifyd-inbox.js", "notifyd-chat.js")
DEMO_PAGE = "demo.html"
_CORE_IMPORT = b'from "./notifyd-core.js"'


@dataclass(frozen=True, slots=True)
class Asset:
    """One served file: its bytes and the version (a content hash) its URL and ETag carry."""

    name: str
    body: bytes
    version: str

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


@functools.cache
def asset(name: str) -> Asset:
    """The packaged file `name` (one of COMPONENTS, or DEMO_PAGE), read once per process,
    with its import of the core pinned to the core's version."""
    body = files(__name__).joinpath(name).read_bytes()
    if name != CORE and _CORE_IMPORT in body:
        pinned = f'from "./{CORE}?v={asset(CORE).version}"'.encode()
        body = body.replace(_CORE_IMPORT, pinned)
    return Asset(name, body, hashlib.sha256(body).hexdigest()[:16])
