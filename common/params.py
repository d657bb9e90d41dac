"""Checking RPC arguments against a handler's signature and type hints.

Each handler is inspected once, at registration: its signature binds the
positional and keyword arguments of a call (missing or unexpected names are
`InvalidParams`), then each bound argument is validated and coerced by a
pydantic `TypeAdapter` for its annotation. Coercion is pydantic's lax mode on
purpose: the gateway forwards JSON, where an ISO string must become a
`datetime` and a query-string "5" an `int`; a type that cannot be coerced
(a string where an int is expected, say) is rejected with the field's path.
Lax mode also reads a boolean as 0 or 1; an `int` refuses one here instead (a
page, a count or a duration given as `true` is a mistake, not a request for 1):
every `int` in a parameter's annotation, also inside `X | None`, `list[...]`,
`dict[...]` or `Annotated[...]`, is checked as `Integer`. (Fields of pydantic
models and dataclasses keep pydantic's own rules: annotate them `Integer`.)
"""

from __future__ import annotations

import dataclasses
import dis
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, TypeAdapter, ValidationError

from common import codec
from common.errors import InvalidParams


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# An `int` that refuses JSON true/false, which lax mode reads as 1/0: a duration or a
# count given as a boolean is a mistake, not a request for 1.
Integer = Annotated[int, BeforeValidator(_not_a_bool)]


def strict_ints(annotation: Any) -> Any:
    """`annotation` with each `int` in it replaced by `Integer` (module docstring)."""
    if annotation is int:
        return Integer
    origin = typing.get_origin(annotation)
    if origin is None or annotation == Integer or origin is typing.Literal:
        return annotation
    args = typing.get_args(annotation)
    if origin is Annotated:  # (its metadata are values, not types)
        base = strict_ints(args[0])
        return annotation if base is args[0] else Annotated[(base, *args[1:])]
    new = tuple(strict_ints(arg) for arg in args)
    if all(a is b for a, b in zip(new, args, strict=True)):
        return annotation
    if origin in (Union, types.UnionType):
        return Union[new]  # noqa: UP007 (built from a tuple)
    try:
        return origin[new]
    except TypeError:  # a generic that cannot be rebuilt this way: as written
        return annotation


class MethodSpec:
    """A registered handler: its name, whether it is async, and its argument checker."""

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name = name
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn)
        self.never_suspends = never_suspends(fn)  # the worker runs it without a task
        self.signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # keeps `Integer`'s check
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        for param in self.signature.parameters.values():
            annotation = hints.get(param.name, Any)
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or annotation is Any:
                continue
            self._adapters[param.name] = TypeAdapter(strict_ints(annotation))
            _register_classes(annotation)
        _register_classes(hints.get("return", Any))
        self.doc = inspect.getdoc(fn) or ""
        # The parameter names when every one is plain (positional or keyword): a call
        # giving exactly that many positional arguments then needs no Signature.bind.
        params = self.signature.parameters.values()
        plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        self._plain = tuple(self.signature.parameters) if plain else None

    def bind(self, args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Validated `(args, kwargs)` for the handler, or `InvalidParams`. Hot path."""
        plain = self._plain
        if plain is not None and not kwargs and len(args) == len(plain):
            # What Signature.bind would do with these, without it (the usual RPC call).
            values = list(args)
            pairs = zip(plain, values, strict=True)
            self._validate(pairs, values.__setitem__, enumerate_names=True)
            return values, {}
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidParams(f"{self.name}: {exc}") from None
        arguments = bound.arguments
        self._validate(list(arguments.items()), arguments.__setitem__, enumerate_names=False)
        return list(bound.args), dict(bound.kwargs)

    def _validate(
        self,
        items: Iterable[tuple[str, Any]],
        store: Callable[[Any, Any], None],
        *,
        enumerate_names: bool,
    ) -> None:
        """Validate each (name, value), storing the result under its index (when
        `enumerate_names`) or its name; every failure is reported at once."""
        details: list[dict[str, Any]] = []
        for index, (name, value) in enumerate(items):
            adapter = self._adapters.get(name)
            if adapter is None:
                continue
            try:
                store(index if enumerate_names else name, adapter.validate_python(value))
            except ValidationError as exc:
                for err in exc.errors(include_url=False, include_input=False):
                    loc = ".".join(str(p) for p in (name, *err["loc"]))
                    details.append({"field": loc, "message": err["msg"], "type": err["type"]})
        if details:
            summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
            raise InvalidParams(f"{self.name}: {summary}", details=details)

    def describe(self) -> dict[str, Any]:
        """A short description for the catalog (parameter names and the docstring)."""
        return {
            "params": [p for p in self.signature.parameters if not p.startswith("_")],
            "doc": self.doc.split("\n", 1)[0],
        }


def _register_classes(annotation: Any) -> None:
    """Register every dataclass / pydantic model reachable from a type hint with the codec."""
    if isinstance(annotation, type) and (
        dataclasses.is_dataclass(annotation) or issubclass(annotation, BaseModel)
    ):
        codec.register(annotation)
    for arg in typing.get_args(annotation):
        _register_classes(arg)


# Opcodes through which a coroutine can suspend (`await`, `async with`, `async for`).
_SUSPENDING_OPS = frozenset(
    {
        "GET_AWAITABLE",
        "SEND",
        "YIELD_VALUE",
        "YIELD_FROM",
        "BEFORE_ASYNC_WITH",
        "GET_AITER",
        "GET_ANEXT",
        "END_ASYNC_FOR",
    }
)


def never_suspends(fn: Any) -> bool:
    """True for an `async def` with no `await`, `async with` or `async for` in its body.

    Its coroutine ends at its first step, so the worker runs it to its end in the
    read loop instead of in a task of its own (a task costs more than a fast
    handler). Nothing task-bound can happen in it: `asyncio.timeout`, task groups
    and anything else that suspends need an `await`. Handlers that do await
    (most real ones), sync handlers and anything that is not a plain function
    get a task, as always.
    """
    code = getattr(fn, "__code__", None)
    if code is None or not inspect.iscoroutinefunction(fn):
        return False
    return not any(op.opname in _SUSPENDING_OPS for op in dis.get_instructions(code))
