"""Phone numbers to E.164, the only form Twilio's Messages API takes without guessing.

Callers send numbers the way people write them: the first seed sends to `7568992589` and its
`TWILIO_PHONE` is national too. A national number only means something in a country, so it is
read with a default region (the tenant's `default_region`, else `NOTIFYD_DEFAULT_REGION`).

A number must be both *possible* (the right length for its country) and *valid* (in a range
that country has assigned) in that reading. Validity matters most for national forms: the
region is a guess, and a number that is invalid there was almost certainly meant for another
country (`7568992589` is no US number, but a valid Indian mobile: `+917568992589` with region
IN). Sending it to `+17568992589` would reach nobody, or the wrong person, so it is refused
with a hint instead. International forms (`+44…`, `011 44…`) are held to the same rule, so a
typo fails here, at send time, with a reason rather than as a Twilio error code later.
"""

from __future__ import annotations

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberFormat

_REGION_HINT = (
    "write it in international form (+<country code>…) or set the tenant's default_region "
    "(NOTIFYD_DEFAULT_REGION globally) to the country it belongs to"
)


class InvalidPhone(ValueError):
    """The number cannot be read as a phone number that can receive SMS; the message says why."""


def to_e164(number: str, region: str) -> str:
    """`number` as E.164 (`+14155552671`), national forms read as numbers of `region`."""
    text = number.strip()
    region = region.strip().upper()
    try:
        parsed = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        raise InvalidPhone(
            f"{number!r} is not a phone number in region {region} ({_parse_reason(exc)})"
        ) from None
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidPhone(f"{number!r} is not a phone number in region {region}")
    if parsed.extension:
        raise InvalidPhone(f"{number!r} has an extension; a text message cannot reach one")
    if not phonenumbers.is_valid_number(parsed):
        international = text.startswith("+") or parsed.country_code != _country_code(region)
        if international:
            raise InvalidPhone(
                f"{number!r} is not an assigned phone number of country code +{parsed.country_code}"
            )
        raise InvalidPhone(
            f"{number!r} is not a valid phone number in region {region}; {_REGION_HINT}"
        )
    return phonenumbers.format_number(parsed, PhoneNumberFormat.E164)


def _country_code(region: str) -> int:
    return phonenumbers.country_code_for_region(region)


def _parse_reason(exc: NumberParseException) -> str:
    reasons = {
        NumberParseException.INVALID_COUNTRY_CODE: "unknown country code, or no such region",
        NumberParseException.NOT_A_NUMBER: "not a number",
        NumberParseException.TOO_SHORT_AFTER_IDD: "too short after the international prefix",
        NumberParseException.TOO_SHORT_NSN: "too short",
        NumberParseException.TOO_LONG: "too long",
    }
    return reasons.get(exc.error_type, "unreadable")
