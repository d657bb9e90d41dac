"""`common.params.strict_ints`: every `int` of an RPC parameter's annotation refuses a
boolean, wherever it sits in the annotation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import pytest
from pydantic import Field, TypeAdapter, ValidationError

from common.errors import InvalidParams
from common.params import MethodSpec, strict_ints


@pytest.mark.parametrize(
    ("annotation", "boolean", "number"),
    [
        (int, True, "5"),
        (int | None, False, "5"),
        (list[int], [1, True], ["5"]),
        (dict[str, int], {"a": True}, {"a": "5"}),
        (tuple[int, ...], (True,), ("5",)),
        (Sequence[int], [False], ["5"]),
        (list[int] | None, [True], ["5"]),
        (Annotated[int, Field(ge=1)], True, "5"),
    ],
)
def test_each_int_refuses_a_boolean_and_still_reads_a_numeric_string(
    annotation: Any, boolean: Any, number: Any
) -> None:
    adapter = TypeAdapter(strict_ints(annotation))
    with pytest.raises(ValidationError, match="a boolean is not a number"):
        adapter.validate_python(boolean)
    assert TypeAdapter(annotation).validate_python(number) == adapter.validate_python(number)


@pytest.mark.parametrize("annotation", [str, bool, Any, Literal[1, 2], dict[str, Any]])
def test_annotations_without_an_int_are_kept(annotation: Any) -> None:
    assert strict_ints(annotation) is annotation


def test_an_annotated_int_keeps_its_own_constraints() -> None:
    adapter = TypeAdapter(strict_ints(Annotated[int, Field(ge=1)]))
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        adapter.validate_python(0)


def test_a_handlers_int_parameters_refuse_booleans_and_its_bools_take_them() -> None:
    async def handler(page: int = 1, ids: list[int] | None = None, flag: bool = False) -> None:
        return None

    spec = MethodSpec("svc.handler", handler)
    assert spec.bind([], {"page": "2", "ids": [3], "flag": True}) == ([2, [3], True], {})
    with pytest.raises(InvalidParams) as info:
        spec.bind([], {"page": True, "ids": [False]})
    assert {d["field"] for d in info.value.details} == {"page", "ids.0"}
