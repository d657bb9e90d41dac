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

A parameter annotated `Caller` (or `Caller | None`) is no argument: the worker
fills it with the call's authenticated caller (`common.caller`), so a call naming
it is `InvalidParams`, as is a call without a caller to a handler requiring one.
Any other annotation holding `Caller` is refused at registration (pydantic would
build a `Caller` from the client's JSON).
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
from common.caller import Caller
from common.errors import ConfigError, InvalidParams


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
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # keeps `Integer`'s check
        self._adapters: dict[str, TypeAdapter[Any]] = {}
        # The parameters the worker fills with the call's caller (module docstring),
        # and whether a call must have one; the others make the signature calls bind to.
        self._callers: tuple[str, ...] = ()
        self._caller_required = False
        arguments: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            annotation = hints.get(param.name, Any)
            required = _caller_parameter(name, param, annotation)
            if required is not None:
                self._callers += (param.name,)
                self._caller_required = self._caller_required or required
                continue
            arguments.append(param)
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or annotation is Any:
                continue
            self._adapters[param.name] = TypeAdapter(strict_ints(annotation))
            _register_classes(annotation)
        _register_classes(hints.get("return", Any))
        self.doc = inspect.getdoc(fn) or ""
        if self._callers and any(
            p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in arguments
        ):
            # It gets its arguments by name (`_bind_with_caller`).
            raise ConfigError(f"{name}: a handler taking a Caller cannot take positional-only "
                              "parameters or *args")  # fmt: skip
        self._arguments = signature.replace(parameters=arguments)
        # The parameter names when every one is plain (positional or keyword): a call
        # giving exactly that many positional arguments then needs no Signature.bind.
        plain = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in arguments)
        self._plain = tuple(p.name for p in arguments) if plain else None
        # Where the positional arguments go, for a handler taking a caller: every one
        # of its parameters can be named (`_caller_parameter`), so it gets them all by name.
        self._positional = tuple(p.name for p in arguments if p.kind is p.POSITIONAL_OR_KEYWORD)

    def bind(
        self, args: list[Any], kwargs: dict[str, Any], who: dict[str, Any] | None = None
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validated `(args, kwargs)` for the handler, or `InvalidParams`. `who` is the
        call's caller in its wire form (`Caller.to_wire`, None: no caller), made a
        `Caller` for the parameters annotated so (module docstring). Hot path."""
        if self._callers:
            return self._bind_with_caller(args, kwargs, who)
        return self._bind_arguments(args, kwargs)

    def _bind_with_caller(
        self, args: list[Any], kwargs: dict[str, Any], who: dict[str, Any] | None
    ) -> tuple[list[Any], dict[str, Any]]:
        for name in self._callers:
            if name in kwargs:
                message = "not an argument: the authenticated caller, set by the gateway"
                detail = {"field": name, "message": message, "type": "caller_not_an_argument"}
                raise InvalidParams(f"{self.name}: {name}: {message}", details=[detail])
        caller = None if who is None else _caller_from(self.name, who)
        if caller is None and self._caller_required:
            raise InvalidParams(
                f"{self.name} acts for an authenticated caller and this call has none: "
                "call it through the gateway (/rpc) or /ws, or pass RpcClient.call a caller="
            )
        args, kwargs = self._bind_arguments(args, kwargs)
        named = dict(zip(self._positional, args, strict=False))
        named.update(kwargs)
        for name in self._callers:
            named[name] = caller
        return [], named

    def _bind_arguments(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Validated `(args, kwargs)` for the handler's arguments (its parameters but
        the caller's)."""
        plain = self._plain
        if plain is not None and not kwargs and len(args) == len(plain):
            # What Signature.bind would do with these, without it (the usual RPC call).
            values = list(args)
            pairs = zip(plain, values, strict=True)
            self._validate(pairs, values.__setitem__, enumerate_names=True)
            return values, {}
        try:
            bound = self._arguments.bind(*args, **kwargs)
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
            "params": [p for p in self._arguments.parameters if not p.startswith("_")],
            "doc": self.doc.split("\n", 1)[0],
        }


def _caller_parameter(method: str, param: inspect.Parameter, annotation: Any) -> bool | None:
    """Whether `param` is filled with the call's caller: True when a call must have
    one (`Caller`), False when it may not (`Caller | None`), None for an argument.

    `ConfigError` for an annotation holding `Caller` otherwise (`list[Caller]`,
    `Caller | str`: pydantic would build one from the client's JSON), for `*args` or
    `**kwargs` of callers.
    """
    if annotation is Caller:
        required = True
    elif typing.get_origin(annotation) in (Union, types.UnionType) and set(
        typing.get_args(annotation)
    ) == {Caller, type(None)}:
        required = False
    elif _mentions_caller(annotation):
        raise ConfigError(f"{method}: annotate {param.name} `Caller` or `Caller | None`")
    else:
        return None
    if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
        raise ConfigError(f"{method}: {param.name} (the caller) must be a named parameter")
    return required


def _caller_from(method: str, who: dict[str, Any]) -> Caller:
    try:
        return Caller.from_wire(who)
    except (ValueError, TypeError) as exc:  # no gateway writes it: a client with Redis access
        raise InvalidParams(f"{method}: the call's caller is malformed: {exc}") from None


def _mentions_caller(annotation: Any) -> bool:
    if annotation is Caller:
        return True
    return any(_mentions_caller(arg) for arg in typing.get_args(annotation))


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
