"""A flow's command-line options, derived from its signature: the signature is the one list of a flow's parameters
(their types, constraints, defaults and help, as `Annotated[..., Field(description=...)]`), read by Prefect for a
deployment's schema and its UI form, and here for argparse and for the checks made before any Prefect work.

The signature is read from the flow module's source (its annotations and defaults evaluated among flows.params'
names), without importing the module: that would import Prefect and torch, seconds before a bad argument could be
refused. tests/test_cli_flows.py checks that what is read equals the imported function's signature.
"""

from __future__ import annotations

import argparse
import ast
import enum
import functools
import importlib.util
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class FlowSpec:
    """A flow function named by its module and name, e.g. FlowSpec("flows.classify_images", "classify_images")."""

    module: str
    function: str

    def load(self) -> Any:
        """The flow itself (this imports its module, Prefect and the rest)."""
        return getattr(importlib.import_module(self.module), self.function)


@functools.cache
def flow_parameters(spec: FlowSpec) -> tuple[tuple[str, Any, Any], ...]:
    """(name, annotation, default) of each parameter of the flow function, read from its module's source;
    `inspect.Parameter.empty` where there is no default."""
    import flows.params

    source = Path(importlib.util.find_spec(spec.module).origin).read_text()
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == spec.function)
    names = {**vars(flows.params)}
    args = node.args.args
    defaults = [inspect.Parameter.empty] * (len(args) - len(node.args.defaults)) + list(node.args.defaults)
    return tuple((a.arg, eval(ast.unparse(a.annotation), names) if a.annotation else str,  # noqa: S307
                  d if d is inspect.Parameter.empty else eval(ast.unparse(d), names))  # noqa: S307
                 for a, d in zip(args, defaults))


def add_flow_arguments(parser: argparse.ArgumentParser, spec: FlowSpec, positional: Iterable[str] = ()) -> None:
    """One argument per parameter of the flow: `positional` ones by name, the others as `--kebab-case` options.
    Each option's help is the parameter's description and its default."""
    positional = set(positional)
    for name, hint, default in flow_parameters(spec):
        base, description, _ = _unwrap(hint)
        text = description or ""
        if name in positional:
            parser.add_argument(name, help=text)
            continue
        flag = "--" + name.replace("_", "-")
        if base is bool:  # a switch: on when given (a parameter that defaults to True also takes --no-NAME)
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            text = f"{text} (default: True)".strip() if default is True else text
            parser.add_argument(flag, action=action, default=bool(default), help=text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "metavar": name.upper()}
        if isinstance(base, type) and issubclass(base, enum.Enum):
            kwargs |= {"choices": [m.value for m in base], "metavar": None}
        if default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            if default is not None:  # what None means is the description's to say ("unset: ...")
                shown = default.value if isinstance(default, enum.Enum) else default
                text = f"{text} (default: {shown})".strip()
        parser.add_argument(flag, help=text, **kwargs)


def flow_arguments(args: argparse.Namespace, spec: FlowSpec) -> dict[str, Any]:
    """The parsed values of the flow's parameters (as strings where typed on the command line)."""
    return {name: getattr(args, name) for name, _, _ in flow_parameters(spec) if hasattr(args, name)}


def check_flow_arguments(spec: FlowSpec, values: dict[str, Any],
                         checks: dict[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """`values` checked and converted against the flow's signature, as Prefect checks a run's parameters, but before
    any Prefect work (no server, no flow run), then through `checks` (the flow's own checks that need the
    filesystem, by parameter). Raises ValueError with one line per bad value."""
    fields = {name: (hint, ... if default is inspect.Parameter.empty else default)
              for name, hint, default in flow_parameters(spec)}
    model = pydantic.create_model(f"{spec.function}_parameters", __config__=pydantic.ConfigDict(extra="forbid"),
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
