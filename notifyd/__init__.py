"""notifyd: one asyncio daemon for notifications, messages, reminders and real-time chat."""

__version__ = "0.1.0"
