"""Templates notifyd ships, used when a tenant has not stored its own for a key and channel.

Only keys notifyd itself sends have a built-in (the interview reminder); an unknown
`template_key` is an error at send time rather than a generic text, because a notification
whose content nobody wrote is worse than one that is refused with a reason.

`interview_reminder` needs `interview_time` (already formatted for the reader); everything
else is optional: `recipient_role` (`candidate`, the default, or `employer`),
`candidate_name`, `employer_name`, `position`, `company`, `application_id`. The seeds'
spelling works too, through the slug aliases of render.py (`"Candidate Name"` →
`candidate_name`, `"Position"` → `position`).
"""

from __future__ import annotations

from notifyd.providers.render import TemplateSource

# Shared by every part: optional names default to "" so a missing one is left out, not an error.
_PROLOGUE = """\
{%- set role = recipient_role | default("candidate", true) -%}
{%- set candidate = candidate_name | default("", true) -%}
{%- set employer = employer_name | default("", true) -%}
{%- set job = position | default("", true) -%}
{%- set org = company | default("", true) -%}
{%- set reference = application_id | default("", true) -%}
{%- set me = employer if role == "employer" else candidate -%}
{%- set other = candidate if role == "employer" else employer -%}
"""

_WHAT = (
    '{{ (" with " ~ other) if other else "" }}'
    '{{ (" for the " ~ job ~ " position") if job else "" }}'
    '{{ (" at " ~ org) if org else "" }}'
)

_EMAIL_SUBJECT = (
    _PROLOGUE + 'Reminder: interview{{ (" for " ~ job) if job else "" }} at {{ interview_time }}'
)

_EMAIL_TEXT = (
    _PROLOGUE
    + """Hello{{ (" " ~ me) if me else "" }},

This is a reminder of your interview"""
    + _WHAT
    + """, scheduled for {{ interview_time }}.
{% if reference %}
Application reference: {{ reference }}
{% endif %}"""
)

_EMAIL_HTML = (
    _PROLOGUE
    + """<p>Hello{{ (" " ~ me) if me else "" }},</p>
<p>This is a reminder of your interview"""
    + _WHAT
    + """, scheduled for <strong>{{ interview_time }}</strong>.</p>
{% if reference %}<p>Application reference: {{ reference }}</p>
{% endif %}"""
)

_SMS_TEXT = (
    _PROLOGUE
    + "Reminder: interview"
    + _WHAT
    + ' on {{ interview_time }}.{{ (" Ref: " ~ reference) if reference else "" }}'
)

_IN_APP_TEXT = _PROLOGUE + "Your interview" + _WHAT + " is scheduled for {{ interview_time }}."

_BUILTINS: dict[tuple[str, str], TemplateSource] = {
    ("interview_reminder", "email"): TemplateSource(
        subject=_EMAIL_SUBJECT, text_body=_EMAIL_TEXT, html_body=_EMAIL_HTML
    ),
    ("interview_reminder", "sms"): TemplateSource(
        subject=None, text_body=_SMS_TEXT, html_body=None
    ),
    ("interview_reminder", "in_app"): TemplateSource(
        subject="Interview reminder", text_body=_IN_APP_TEXT, html_body=None
    ),
}


def builtin(template_key: str, channel: str) -> TemplateSource | None:
    """notifyd's own template for `template_key` on `channel`, or None when there is none."""
    return _BUILTINS.get((template_key, channel))


def builtin_keys() -> list[tuple[str, str]]:
    """Every (template_key, channel) with a built-in, for checks and documentation."""
    return sorted(_BUILTINS)
