"""The one place where each kind of config value is checked, and how a field is found in a TOML table.

A :class:`Rule` is written once and used by every layer that sees the value: the attrs validator of a plain
constructor (``Timeouts(drain=0)`` raises ValueError), the TOML reader (``drain = 0`` names the file and key) and a
command-line flag (``--name 'a b'``). Only the wording differs between the layers, because each layer's message is
about what its user typed; the predicate and the limits are the rule's alone.

A :class:`Key`, stored in an attrs field's metadata (:func:`toml`), says under which TOML key the field is read and
how; the TOML loader, its "unknown key" check and the docs test all walk these, so a new key is one attrs field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import attrs
from trio_tunnel.errors import ConfigError

if TYPE_CHECKING:
    from .toml import Section

__all__ = ["Key", "Rule", "build", "dedupe", "describe", "toml"]

_T = TypeVar("_T")

TOML: Final = "trio_tunnel.config.toml"
"""The attrs metadata key under which a field's :class:`Key` is stored."""


def describe(value: object) -> str:
    """A TOML value as a message shows it: ``'abc'``, ``5``, ``the boolean true``, ``a list``."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} value"


def _typed(value: object, types: tuple[type, ...]) -> bool:
    """isinstance, except that a bool is never a number (TOML ``true`` is not the port 1)."""
    return isinstance(value, types) and (bool in types or not isinstance(value, bool))


@attrs.frozen
class Rule:
    """One kind of value: its Python types, its check, and the words each layer uses to refuse it.

    Message templates may use ``{name}`` (the attrs field), ``{value}`` (the value; ``{value!r}`` works),
    ``{got}`` (the value as :func:`describe` shows it), ``{expected}`` and ``{problem}`` (what :attr:`problem` said).
    """

    types: tuple[type, ...]
    """Accepted Python (and TOML) types; a value of another type is a TypeError for a plain constructor."""
    expected: str
    """What a file or a flag must give, e.g. ``a number of seconds > 0``."""
    plain: str
    """The plain constructor's ValueError, e.g. ``{name} must be a positive number of seconds, got {value}``."""
    problem: Callable[[Any], str | None] = lambda _value: None
    """The check itself: None when the value (of the right type) is fine, else what is wrong with it."""
    wrong_type: str = "{name} must be {expected}, got {value!r}"
    """The plain constructor's message for a value of the wrong type ..."""
    wrong_type_error: type[Exception] = TypeError
    """... and its exception class."""
    file: str = "expected {expected}, got {got}"
    """A config file's message (after ``FILE: KEY: ``)."""
    file_wrong_type: str | None = None
    """A config file's message for a value of the wrong type; default :attr:`file`."""
    convert: Callable[[Any], Any] = lambda value: value
    """Normalises an accepted value (an int number of seconds becomes a float)."""

    def _words(self, template: str, value: object, name: str, problem: str | None = None) -> str:
        return template.format(name=name, value=value, got=describe(value), expected=self.expected, problem=problem)

    def converter(self, value: Any) -> Any:
        """attrs converter: :attr:`convert` for a value of the right type (the validator refuses the others)."""
        return self.convert(value) if _typed(value, self.types) else value

    def validator(self, _inst: object, attr: attrs.Attribute[Any], value: Any) -> None:
        """attrs validator: TypeError for a wrong type, ValueError when the check fails."""
        self.check(value, name=attr.name)

    def check(self, value: Any, *, name: str) -> None:
        """The plain layer's check, for code that validates outside an attrs constructor (spec parsing)."""
        if not _typed(value, self.types):
            raise self.wrong_type_error(self._words(self.wrong_type, value, name))
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(self._words(self.plain, value, name, problem))

    def from_file(self, value: Any) -> Any:
        """A TOML value, converted; raises ValueError with the file layer's message."""
        if not _typed(value, self.types):
            message = self._words(self.file_wrong_type or self.file, value, "")
            if self.types == (int,) and isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
                message += " (a string: remove the quotes)"
            raise ValueError(message)
        problem = self.problem(value)
        if problem is not None:
            raise ValueError(self._words(self.file, value, "", problem))
        return self.convert(value)

    def from_flag(self, flag: str, value: Any) -> Any:
        """A command-line value; raises ConfigError ``FLAG 'VALUE': EXPECTED``."""
        if not _typed(value, self.types) or self.problem(value) is not None:
            raise ConfigError(f"{flag} {value!r}: {self.expected}")
        return self.convert(value)

    def field(self, **kwargs: Any) -> Any:
        """An attrs field checked by this rule (extra arguments go to ``attrs.field``)."""
        return attrs.field(converter=self.converter, validator=self.validator, **kwargs)


def _unless(ok: Callable[[Any], bool]) -> Callable[[Any], str | None]:
    return lambda value: None if ok(value) else "no"


def port_rule(low: int) -> Rule:
    """A TCP port ``low``-65535 (0 = any free port, where that makes sense)."""
    return Rule(
        types=(int,),
        expected=f"an integer port {low}-65535",
        plain=f"{{name}} must be {low}-65535, got {{value}}",
        wrong_type="{name} must be an int, got {value!r}",
        problem=_unless(lambda port: low <= port <= 65535),
    )


ANY_PORT: Final = port_rule(0)
REAL_PORT: Final = port_rule(1)

SECONDS: Final = Rule(
    types=(int, float),
    expected="a number of seconds > 0",
    plain="{name} must be a positive number of seconds, got {value}",
    wrong_type="expected a number of seconds, got {value!r}",
    problem=_unless(lambda seconds: 0 < seconds < math.inf),
    convert=float,
)

FRACTION: Final = Rule(
    types=(int, float),
    expected="a fraction 0 <= jitter < 1",
    plain="{name} must be a fraction 0 <= jitter < 1, got {value}",
    wrong_type="expected a number of seconds, got {value!r}",
    problem=_unless(lambda fraction: 0 <= fraction < 1),
    convert=float,
)

COUNT: Final = Rule(
    types=(int,),
    expected="an integer count >= 1",
    plain="{name} must be a positive integer, got {value!r}",
    wrong_type="{name} must be a positive integer, got {value!r}",
    wrong_type_error=ValueError,
    problem=_unless(lambda count: count >= 1),
)

BOOLEAN: Final = Rule(types=(bool,), expected="true or false", plain="{name} must be true or false, got {value!r}")

STRING: Final = Rule(types=(str,), expected="a string", plain="{name} must be a string, got {value!r}")


def seconds(default: float, **kwargs: Any) -> Any:
    """An attrs field: a positive number of seconds, read from TOML under the field's name."""
    return SECONDS.field(default=default, metadata=toml(rule=SECONDS), **kwargs)


def count(default: int) -> Any:
    """An attrs field: a positive count, read from TOML under the field's name."""
    return COUNT.field(default=default, metadata=toml(rule=COUNT))


def optional_count() -> Any:
    """An attrs field: a positive count or None (not set: the program sizes it), read from TOML under its name."""
    return attrs.field(
        default=None,
        converter=COUNT.converter,
        validator=attrs.validators.optional(COUNT.validator),
        metadata=toml(rule=COUNT),
    )


def to_tuple(items: Iterable[Any]) -> tuple[Any, ...]:
    """attrs converter: any iterable becomes a tuple (so a frozen config holds no list). Not generic: the attrs mypy
    plugin takes ``__init__``'s parameter type from the converter's, and cannot solve a type variable there."""
    return tuple(items)


def dedupe(items: Iterable[_T]) -> tuple[_T, ...]:
    """The items in order, each once."""
    return tuple(dict.fromkeys(items))


def build(cls: Callable[..., _T], fields: Mapping[str, Any], *, source: str) -> _T:
    """Construct a config, turning a validator's ValueError/TypeError into a ConfigError naming ``source``."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------------------------------
# TOML keys


@attrs.frozen(kw_only=True)
class Key:
    """How one attrs field is read from a TOML table. Exactly one of ``rule``, ``parse``, ``read``, ``table``,
    ``entries`` says how; the key is named after the field unless ``name`` is given."""

    name: str | None = None
    """The TOML key; default the field's name."""
    rule: Rule | None = None
    """A plain value checked by this rule."""
    parse: Callable[[Any], Any] | None = None
    """A value turned into the field's value; raises ValueError or ConfigError with the message for the key."""
    read: Callable[[Section], Any] | None = None
    """Reads the table itself (for a field fed by several keys, e.g. ``token``/``tokens``/``token_file``)."""
    also: tuple[str, ...] = ()
    """Further TOML keys that ``read`` consumes (listed after ``name``)."""
    table: type | None = None
    """A sub-table (``[server.timeouts]``) holding the fields of this attrs class."""
    entries: type | None = None
    """A table of named sub-tables (``[client.expose.NAME]``), each the fields of this attrs class plus ``name``."""
    check: Callable[[tuple[Any, ...]], None] | None = None
    """For ``entries``: a check of all entries together (raises ValueError)."""
    spread: tuple[str, str] | None = None
    """The parsed HostPort fills these two fields (host, port) instead of one."""
    missing: str | None = None
    """Required within its table: the message after ``missing: `` when it is absent."""

    def names_for(self, field: str) -> tuple[str, ...]:
        """Every TOML key this field reads."""
        return (self.name or field, *self.also)


def toml(**kwargs: Any) -> dict[str, Key]:
    """Field metadata: ``attrs.field(metadata=toml(...))`` makes the field a TOML key (see :class:`Key`)."""
    return {TOML: Key(**kwargs)}


def keys_of(cls: type) -> list[tuple[attrs.Attribute[Any], Key]]:
    """The fields of attrs class ``cls`` that are read from TOML, in declaration order."""
    return [(field, field.metadata[TOML]) for field in attrs.fields(cls) if TOML in field.metadata]


WORKERS: Final = Rule(
    types=(int, str),
    expected='an integer count >= 1 or "auto" (one per core)',
    plain='{name} must be an integer >= 1 or "auto", got {value!r}',
    wrong_type='{name} must be an integer >= 1 or "auto", got {value!r}',
    wrong_type_error=ValueError,
    problem=lambda value: None if value == "auto" or (isinstance(value, int) and value >= 1) else "no",
)
"""``workers`` of ``[server]`` (``--workers``): server processes sharing the link port (tunnel/workers.py)."""
