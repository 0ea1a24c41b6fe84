"""The generic reading: pydantic models that report every problem of a document, each at its JSON path.

A config section is a frozen pydantic model (`Section`) whose fields each carry their type, default,
validation and help in one declaration. pydantic already collects every field's error with its
location; three things are added here, in `Section`'s wrap validator, so that a document with many
problems gets all of them in one `ccm-wsgi check`:

* Relations between fields (`Section.relations`: "min_version must not be above max_version", "duplicate
  token") are checked even when some other field of the object is invalid. pydantic skips model-level
  checks as soon as one field fails, so on failure the object is read again without the keys that
  failed (they fall back to their defaults, which the relations treat as "not given") and, for a key
  whose value is a section or a list of them, with the partial objects read from it. The relations run
  on that partial object; it is never returned.
* sing-box's reading: `null` means absent, a required key is marked `Required` (every field has a
  default, so the partial object above can always be built), a key given twice is reported.
* Messages: pydantic's error types become short sentences ("unknown key", "must be a list"), never
  quoting the value (it may be a token); a message may name another place of the document (`REF`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple, NoReturn, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    ModelWrapValidatorHandler,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema
from typing_extensions import Self

from .jsonc import duplicate_keys

Loc = tuple[str | int, ...]
T = TypeVar("T")
S = TypeVar("S", bound="Section")

# Where a message names another place of the document: each REF is replaced by the path of one of `refs`.
REF = "\0"  # never in a message otherwise: values in messages are JSON-quoted


class Problem(NamedTuple):
    """One problem: where (relative to the object that found it), what, and the other places it names."""

    loc: Loc
    message: str
    refs: tuple[Loc, ...] = ()
    depth: int | None = None  # len(loc) where the problem was found; refs are relative to that object


def problem_error(problems: Iterable[Problem]) -> ValidationError:
    """A ValidationError carrying `problems`; pydantic prefixes each location as it travels up."""
    line_errors: list[Any] = [
        {"type": PydanticCustomError("ccm", "{message}", {
            "message": p.message, "refs": p.refs, "depth": len(p.loc) if p.depth is None else p.depth}),
         "loc": p.loc, "input": None}
        for p in problems
    ]
    return ValidationError.from_exception_data("config", line_errors)


def fail(message: str) -> NoReturn:
    """Refuse the value being validated; the problem is reported at its location."""
    raise PydanticCustomError("ccm", "{message}", {"message": message, "refs": (), "depth": 0})


# pydantic's own error types, for values that no validator of ours has seen (a list where an object goes).
_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown key",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
}


def as_problem(error: ErrorDetails) -> Problem | None:
    """One pydantic error as a Problem; None for an error that only follows from another one."""
    kind, loc = error["type"], tuple(error["loc"])
    if kind == "default_factory_not_called":  # a default computed from a field that failed
        return None
    if kind == "ccm":
        ctx = error.get("ctx") or {}
        return Problem(loc, str(ctx["message"]), tuple(ctx["refs"]), int(ctx["depth"]))
    return Problem(loc, _MESSAGES.get(kind, "invalid value"))


def problems_of(exc: ValidationError) -> list[Problem]:
    return [p for p in map(as_problem, exc.errors()) if p is not None]


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def path(loc: Loc) -> str:
    """`services[0].users[1].token`; `$` for the root; keys that are not bare words JSON-quoted."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _BARE_KEY.fullmatch(part):
            text = f"{text}.{part}" if text else part
        else:
            text = f"{text or '$'}[{json.dumps(part)}]"
    return text or "$"


def located(error: ErrorDetails) -> tuple[Loc, str] | None:
    """An error of the whole document as (absolute location, message with the places it names)."""
    problem = as_problem(error)
    if problem is None:
        return None
    depth = len(problem.loc) if problem.depth is None else problem.depth
    prefix = problem.loc[: len(problem.loc) - depth]
    message = problem.message
    for ref in problem.refs:
        message = message.replace(REF, path(prefix + ref), 1)
    return problem.loc, message


def position(document: object, loc: Loc) -> tuple[int, ...]:
    """Where `loc` is in the document, for listing problems in the order of the file."""
    result: list[int] = []
    node = document
    for part in loc:
        if isinstance(node, Mapping):
            keys = list(node)
            result.append(keys.index(part) if part in node else len(keys))
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            result.append(part)
            node = node[part] if 0 <= part < len(node) else None
        else:
            result.append(0)
            node = None
    return tuple(result)


# --------------------------------------------------------------------------------------------------
# Field markers
# --------------------------------------------------------------------------------------------------


class Required:
    """Marks a field that must be given (and not null); `message` replaces "required"."""

    def __init__(self, message: str = "required"):
        self.message = message


REQUIRED = Required()


class Refused:
    """A key sing-box has that ccm-wsgi refuses whatever its value (even null), with `message`."""

    def __init__(self, message: str):
        self.message = message

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self._refuse)

    def _refuse(self, value: object) -> NoReturn:
        fail(self.message)


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


class ReadContext:
    """What one reading of a document shares: every object read so far, by the identity of its JSON value.

    A section that fails keeps its partial object here, so that the section holding it can still
    check its relations (duplicate tokens among users of which one is broken, say).
    """

    def __init__(self) -> None:
        self._built: dict[int, tuple[object, object]] = {}

    def keep(self, raw: object, result: object) -> None:
        self._built[id(raw)] = (raw, result)  # the raw value is kept alive, so that its id stays its own

    def get(self, raw: object, default: object = None) -> object:
        entry = self._built.get(id(raw))
        return entry[1] if entry is not None and entry[0] is raw else default


def context_of(info: ValidationInfo) -> ReadContext | None:
    return info.context if isinstance(info.context, ReadContext) else None


class Reading(NamedTuple):
    """How an object was read, for its relations: the keys given (not null) and those whose value failed."""

    given: Mapping[str, Any]
    broken: frozenset[str] = frozenset()

    def valid(self, *keys: str) -> bool:
        """Whether none of `keys` failed (a failed key reads as its default)."""
        return not self.broken.intersection(keys)


_MISSING = object()


class Section(BaseModel):
    """A JSON object of the config: unknown keys are errors, values are never coerced, objects are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # on a partial object (see the module docstring): the keys whose values failed
    _broken: frozenset[str] = PrivateAttr(default=frozenset())
    # per class, from the field declarations: JSON key -> field name, keys where null means absent (all but
    # the refused ones, refused even as null), required keys
    _field_names: ClassVar[dict[str, str]] = {}
    _nullable: ClassVar[frozenset[str]] = frozenset()
    _required: ClassVar[dict[str, Required]] = {}

    def relations(self, read: Reading) -> Iterable[Problem]:
        """Problems between fields (or with the raw keys in `read`), at locations relative to this object."""
        return ()

    def was_read(self, *keys: str) -> bool:
        """Whether the values of `keys` were read (always, but on a partial object: see the module docstring)."""
        return not self._broken.intersection(keys)

    @classmethod
    def unknown_key(cls, key: str) -> str:
        """The message for a key this section does not have."""
        return "unknown key"

    @model_validator(mode="wrap")
    @classmethod
    def _read(cls, data: Any, handler: ModelWrapValidatorHandler[Self], info: ValidationInfo) -> Self:
        if isinstance(data, BaseModel):
            return handler(data)
        if not isinstance(data, Mapping) or not all(isinstance(key, str) for key in data):
            raise problem_error([Problem((), "must be an object")])
        ctx = context_of(info)
        strict = cls.model_config.get("extra") == "forbid"  # an opaque object is not looked into
        problems = [Problem((key,), "duplicate key") for key in sorted(duplicate_keys(data)) if strict]
        given = {key: value for key, value in data.items() if value is not None or key not in cls._nullable}
        missing = [key for key in cls._required if key not in given]
        problems += [Problem((key,), cls._required[key].message) for key in missing]
        errors: list[Problem] = []
        result: Self | None
        try:
            result = handler(given)
        except ValidationError as exc:
            errors = [cls._translated(p) for p in problems_of(exc)]
            result = cls._salvage(given, errors, handler, ctx)
        if result is not None:
            result._broken |= frozenset(missing)  # a required key that is absent reads as broken too
            problems += result.relations(Reading(given, result._broken))
        if ctx is not None:
            ctx.keep(data, result)
        if errors or problems:
            raise problem_error(errors + problems)
        assert result is not None
        return result

    @classmethod
    def _translated(cls, problem: Problem) -> Problem:
        if problem.message == "unknown key" and len(problem.loc) == 1 and isinstance(problem.loc[0], str):
            return problem._replace(message=cls.unknown_key(problem.loc[0]))
        return problem

    @classmethod
    def _salvage(cls, given: dict[str, Any], errors: list[Problem], handler: ModelWrapValidatorHandler[Self],
                 ctx: ReadContext | None) -> Self | None:
        """The object read without the keys that failed, with partial objects where they can be had."""
        failed = {p.loc[0] for p in errors if p.loc}
        if any(not p.loc for p in errors):
            return None
        try:
            partial = handler({key: value for key, value in given.items() if key not in failed})
        except ValidationError:
            return None
        updates = {}
        for key in failed:
            name = cls._field_names.get(str(key))
            if name is not None and ctx is not None:
                value = cls._rebuilt(name, given[str(key)], ctx)
                if value is not _MISSING:
                    updates[name] = value
        if updates:
            partial = partial.model_copy(update=updates)
        partial._broken = frozenset(str(key) for key in failed)
        return partial

    @classmethod
    def _rebuilt(cls, name: str, raw: object, ctx: ReadContext) -> object:
        """What could be read of a failed value: its section, or its list with None for unreadable items."""
        if isinstance(raw, Mapping):
            found = ctx.get(raw, _MISSING)
            return _MISSING if found is None else found
        item = _item_adapter(cls, name)
        if not isinstance(raw, list) or item is None:
            return _MISSING
        values = []
        for value in raw:
            found = ctx.get(value, _MISSING) if isinstance(value, Mapping) else _MISSING
            values.append(_try(item, value) if found is _MISSING else found)
        return tuple(values)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._field_names = {field.alias or name: name for name, field in cls.model_fields.items()}
        cls._nullable = frozenset(key for key, name in cls._field_names.items()
                                  if not any(isinstance(m, Refused) for m in cls.model_fields[name].metadata))
        cls._required = {key: marker for key, name in cls._field_names.items()
                         for marker in cls.model_fields[name].metadata if isinstance(marker, Required)}


@functools.cache
def _item_adapter(cls: type[Section], name: str) -> TypeAdapter[Any] | None:
    """For a field `tuple[X, ...]` whose items are validated one by one: X, to read the items that are valid."""
    field = cls.model_fields[name]
    args = get_args(field.annotation)
    if len(args) == 2 and args[1] is Ellipsis and not field.metadata:
        return TypeAdapter(args[0])
    return None  # not a list, or a list checked as a whole (a string-or-list)


def _try(adapter: TypeAdapter[Any], value: object) -> object:
    try:
        return adapter.validate_python(value)
    except ValidationError:
        return None


def entries(items: Iterable[T]) -> Iterator[tuple[int, T]]:
    """(index, item) of a list field, skipping the items a partial object could not read: in a partial
    object (see the module docstring), such an item is None whatever the field's type says."""
    for index, item in enumerate(items):
        if item is not None:
            yield index, item


def read_as(cls: type[S], data: object, info: ValidationInfo) -> S:
    """Read `data` as `cls` from inside another validator, in the same reading (tagged unions)."""
    return cls.model_validate(data, context=info.context)


def check_value(check: Callable[[Any], T], value: object, loc: Loc) -> T | Problem:
    """Run a value's check outside a field (the key a tagged union dispatches on): its result or its problem."""
    try:
        return check(value)
    except PydanticCustomError as exc:
        return Problem(loc, str((exc.context or {}).get("message", exc.message())))


def key_of(data: Mapping[str, Any], key: str, check: Callable[[Any], T]) -> T | Problem:
    """A required key read before its object (the key a tagged union dispatches on): its value or its problem."""
    if data.get(key) is None:
        return Problem((key,), "required")
    return check_value(check, data[key], (key,))


def claim(seen: dict[T, Loc], value: T, loc: Loc) -> Loc | None:
    """Record that `loc` uses `value`; the first location that used it, if it was not `loc`."""
    first = seen.setdefault(value, loc)
    return first if first != loc else None


def quote(value: str) -> str:
    """A (non-secret) value for a message: JSON-quoted, so control characters cannot break the line."""
    return json.dumps(value)
