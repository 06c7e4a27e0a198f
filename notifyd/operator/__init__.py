"""Operator commands behind `notifyd send | dlq | reminders | stats`.

Each module is one command's logic; `cli.py` only parses arguments and calls it. A command
opens only what it needs (`connect`), through the same functions the daemon uses, so what
the shell shows and does is what the daemon would.
"""
