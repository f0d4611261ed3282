"""A method setting's value as its config field's type wants it (from YAML, the command line or ``unlearn(**settings)``)."""

from __future__ import annotations

import math
import typing

from genunlearn.errors import UserError


def typed_setting(key: str, value, hint):
    """``value`` as the config field ``key`` of type ``hint`` wants it: a bool only from true/false (or 1/0), a whole
    number where a count goes, a finite number where a float goes (an int becomes a float), text where text goes,
    None where the field is optional. Anything else is a UserError naming the setting and what it takes."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"setting {key} cannot be null")
    if bool in allowed:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise UserError(f"setting {key} takes true or false, got {value!r}")
    if isinstance(value, str) and str in allowed:
        return value
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and not math.isfinite(value):
        raise UserError(f"setting {key} takes a finite number, got {value!r}")
    if numeric and int in allowed and (isinstance(value, int) or float not in allowed and value.is_integer()):
        return int(value)
    if numeric and float in allowed:
        return float(value)
    wanted = " or ".join("a whole number" if t is int else "a number" if t is float else "text" for t in allowed if t is not type(None))
    raise UserError(f"setting {key} takes {wanted}, got {value!r}")
