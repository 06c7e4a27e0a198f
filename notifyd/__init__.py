"""notifyd: one asyncio daemon for notifications, messages, reminders and real-time chat."""

from importlib.metadata import PackageNotFoundError, version

# pyproject.toml's [project] version is the one source; every place that shows a version
# (`notifyd --version`, notifyd_build_info, the OpenAPI document) reads this name. A source
# tree imported without being installed has no metadata and says so instead of guessing.
try:
    __version__ = version("notifyd")
except PackageNotFoundError:
    __version__ = "0+unknown"
