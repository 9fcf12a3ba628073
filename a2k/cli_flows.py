"""A flow's command-line options, derived from its signature: the signature is the one list of a flow's parameters
(their types, constraints, defaults and help, as `Annotated[..., Field(description=...)]`), read by Prefect for a
deployment's schema and its UI form, and here for argparse and for the checks made before any Prefect work."""

from __future__ import annotations

import argparse
import enum
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

import pydantic
from pydantic.fields import FieldInfo


def _unwrap(hint: Any) -> tuple[Any, str | None, bool]:
    """The base type of a parameter's annotation, its Field description, and whether None is allowed."""
    description, optional = None, False
    while True:
        origin = typing.get_origin(hint)
        if origin is typing.Annotated:
            base, *meta = typing.get_args(hint)
            description = description or next(
                (m.description for m in meta if isinstance(m, FieldInfo) and m.description), None)
            hint = base
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(hint))
            hint = args[0] if len(args) == 1 else str
        else:
            return hint, description, optional


def _parameters(fn: Callable) -> list[tuple[inspect.Parameter, Any]]:
    hints = typing.get_type_hints(fn, include_extras=True)
    return [(p, hints.get(name, str)) for name, p in inspect.signature(fn).parameters.items()]


def add_flow_arguments(parser: argparse.ArgumentParser, fn: Callable, positional: Iterable[str] = (),
                       helps: dict[str, str] | None = None) -> None:
    """One argument per parameter of `fn` (a flow's function): `positional` ones by name, the others as
    `--kebab-case` options. Each option's help is the parameter's description (or `helps[name]`) and its default."""
    positional, helps = set(positional), helps or {}
    for p, hint in _parameters(fn):
        base, description, _ = _unwrap(hint)
        text = helps.get(p.name) or description or ""
        if p.name in positional:
            parser.add_argument(p.name, help=text)
            continue
        flag = "--" + p.name.replace("_", "-")
        if base is bool:  # a switch: on when given (a parameter that defaults to True also takes --no-NAME)
            action = argparse.BooleanOptionalAction if p.default is True else "store_true"
            parser.add_argument(flag, action=action, default=bool(p.default), help=text)
            continue
        kwargs: dict[str, Any] = {"dest": p.name, "metavar": p.name.upper()}
        if isinstance(base, type) and issubclass(base, enum.Enum):
            kwargs |= {"choices": [m.value for m in base], "metavar": None}
        if p.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = p.default
            if p.default is not None:  # what None means is the description's to say ("unset: ...")
                shown = p.default.value if isinstance(p.default, enum.Enum) else p.default
                text = f"{text} (default: {shown})".strip()
        parser.add_argument(flag, help=text, **kwargs)


def flow_arguments(args: argparse.Namespace, fn: Callable) -> dict[str, Any]:
    """The parsed values of `fn`'s parameters (as strings where typed on the command line)."""
    return {p.name: getattr(args, p.name) for p, _ in _parameters(fn) if hasattr(args, p.name)}


def check_flow_arguments(fn: Callable, values: dict[str, Any],
                         checks: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """`values` checked and converted against `fn`'s signature, as Prefect checks a run's parameters, but before
    any Prefect work (no server, no flow run), then through `checks` (the flow's own checks that need the
    filesystem, by parameter). Raises ValueError with one line per bad value."""
    fields = {p.name: (hint, ... if p.default is inspect.Parameter.empty else p.default) for p, hint in _parameters(fn)}
    model = pydantic.create_model(f"{fn.__name__}_parameters", __config__=pydantic.ConfigDict(extra="forbid"),
                                  **fields)
    try:
        checked = model(**values)
    except pydantic.ValidationError as e:
        raise ValueError("; ".join(_one_line(err, values) for err in e.errors())) from None
    checked = {name: getattr(checked, name) for name in values}
    for name, check in (checks or {}).items():
        checked[name] = check(checked[name])
    return checked


def _one_line(err: dict[str, Any], values: dict[str, Any]) -> str:
    name = ".".join(str(part) for part in err["loc"][:1])
    message = err["msg"].removeprefix("Value error, ")
    return f"--{name.replace('_', '-')} {values.get(name)!r}: {message}"
