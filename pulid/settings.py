"""Generation settings declared once: name, type, default, range, label and help in one place.

A :class:`Setting` is attached to a dataclass field with :func:`setting`; the request dataclass
(:class:`pulid.request.GenerationRequest`) is then the single declaration that the Gradio
controls, the command-line flags, the request validation and the PNG metadata are all built from.
Values from outside (browser strings, JSON numbers, command-line text) go through
:meth:`Setting.coerce`, which refuses what is not a value of the setting with a message that says
what is allowed: ``2.5`` steps, a seed of ``1e400``, ``NaN`` guidance, a 2 MB prompt.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flux.errors import UserError


class InvalidRequestError(UserError, ValueError):
    """A request setting is missing, of the wrong type or out of range; the message says what is allowed."""


@dataclass(frozen=True)
class Setting:
    """One generation setting: its type and allowed values, and how people see it."""

    kind: type  # int, float or str
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # the UI's step; also the required multiple with ``multiple_of``
    multiple_of: int | None = None
    choices: tuple | None = None
    max_length: int | None = None  # strings: characters
    group: str = "main"  # where the UI shows it: "main", "image", "advanced", "output", "dev" (--dev)
    widget: str = "slider"  # "slider", "textbox" or "radio" (text with choices)
    flags: tuple[str, ...] = ()  # other command-line spellings (the official names)
    name: str = ""  # set from the field it is attached to

    def describe_range(self) -> str:
        """What values are allowed, in words ("a whole number from 1 to 50"), for messages and help."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.kind is str:
            return f"text of at most {self.max_length:,} characters"
        parts = []
        if self.multiple_of:
            parts.append(f"a multiple of {self.multiple_of}")
        elif self.kind is int:
            parts.append("a whole number")
        else:
            parts.append("a number")
        if self.minimum is not None and self.maximum is not None:
            parts.append(f"from {_show(self.minimum)} to {_show(self.maximum)}")
        return " ".join(parts)

    def _refuse(self, value: Any) -> InvalidRequestError:
        return InvalidRequestError(f"{self.label} must be {self.describe_range()} (got {shown(value)}).")

    def coerce(self, value: Any) -> Any:
        """``value`` as this setting's type, checked; :class:`InvalidRequestError` otherwise."""
        if self.kind is str:
            return self._coerce_text(value)
        number = self._coerce_number(value)
        if self.choices is not None:
            if number not in self.choices:
                raise self._refuse(value)
            return number
        if (self.minimum is not None and number < self.minimum) or (
            self.maximum is not None and number > self.maximum
        ):
            raise self._refuse(value)
        if self.multiple_of and number % self.multiple_of:
            raise self._refuse(value)
        return number

    def _coerce_text(self, value: Any) -> str:
        if value is None:  # an emptied box: empty text, or the default of a choice
            return "" if self.choices is None else self.default
        if not isinstance(value, str):
            raise InvalidRequestError(f"{self.label} must be text (got {type(value).__name__}).")
        if self.choices is not None:
            choice = value.strip().lower() or self.default
            if choice not in self.choices:
                raise self._refuse(value)
            return choice
        if self.max_length is not None and len(value) > self.max_length:
            raise InvalidRequestError(
                f"{self.label} is too long ({len(value):,} characters; at most {self.max_length:,})."
            )
        try:
            value.encode("utf-8")  # a lone surrogate (from JSON's "\\ud800" or a bad byte) is not text
        except UnicodeEncodeError:
            raise InvalidRequestError(
                f"{self.label} holds characters that are not valid Unicode: retype or paste it again."
            ) from None
        return value

    def _coerce_number(self, given: Any) -> int | float:
        value = given
        if isinstance(value, bool) or value is None:
            raise self._refuse(given)
        if isinstance(value, str):
            text = value.strip()
            if not text:  # an emptied box means the default (an empty seed: a random one)
                return self.default
            if len(text) > MAX_NUMBER_CHARACTERS:  # int() refuses past 4,300 digits, with its own error
                raise self._refuse(given)
            # Only plain ASCII numbers: Python's int() and float() would also take "1_000", other
            # scripts' digits and "1e3" for a whole number, and round a long one through a float.
            if WHOLE_NUMBER.fullmatch(text):
                value = int(text.split(".")[0])
            elif self.kind is float and DECIMAL_NUMBER.fullmatch(text):
                value = float(text)
            else:
                raise self._refuse(given)
        if isinstance(value, int):
            return value if self.kind is int else float(value)
        try:
            number = float(value)  # numpy scalars and the like
        except (TypeError, ValueError, OverflowError):
            raise self._refuse(given) from None
        if not math.isfinite(number):
            raise self._refuse(given)
        if self.kind is int:
            # a float past 2**53 is a whole number, but maybe not the one that was sent
            if not number.is_integer() or abs(number) >= 2**53:
                raise self._refuse(given)
            return int(number)
        return number


MAX_NUMBER_CHARACTERS = 64  # far past any setting's range (a seed is at most 20 digits)
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+(\.0*)?")  # "42", "-3", "42.0" (what a number box may send)
DECIMAL_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def shown(value: Any, limit: int = 45) -> str:
    """``value`` as a message quotes it: a hostile one is named, not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(number: float) -> str:
    return f"{number:g}" if abs(number) < 1e15 else f"{int(number):,}"


def setting(kind: type, default: Any, label: str, *, required: bool = False, **options: Any) -> Any:
    """A dataclass field carrying its :class:`Setting` (``required``: the field has no default)."""
    declared = Setting(kind, default, label, **options)
    if required:
        return dataclasses.field(metadata={"setting": declared})
    return dataclasses.field(default=default, metadata={"setting": declared})


def declared_settings(cls: type) -> tuple[Setting, ...]:
    """The settings of a dataclass, in field order, each with its field's name."""
    return tuple(
        dataclasses.replace(f.metadata["setting"], name=f.name)
        for f in dataclasses.fields(cls)
        if "setting" in f.metadata
    )


def coerce_all(settings: Sequence[Setting], values: dict[str, Any]) -> dict[str, Any]:
    """Coerce every given value; all problems are reported together in one error."""
    unknown = sorted(set(values) - {s.name for s in settings})
    if unknown:
        raise InvalidRequestError(f"Unknown setting(s): {', '.join(unknown)}.")
    out, problems = {}, []
    for declared in settings:
        if declared.name not in values:
            continue
        try:
            out[declared.name] = declared.coerce(values[declared.name])
        except InvalidRequestError as err:
            problems.append(str(err))
    if problems:
        raise InvalidRequestError(" ".join(problems))
    return out
