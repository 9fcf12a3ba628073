"""Load a torch.export program (.pt2) without letting the file run code: `torch.export.load` unpickles weights,
constants and sample inputs it marks as pickled, evaluates symbolic shapes with sympy (an `eval`), compiles the
program's guard code and dlopens AOTInductor libraries; the archive is checked for all of these first."""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

# The parts of an archive that `torch.export.save` writes for one program, as `PyTorchFileReader` names them
# (the zip's top folder left out). Anything else (AOTInductor libraries, custom or opaque objects, the legacy
# pickled `.pt` weights, extra files) is refused.
_ALLOWED_RECORDS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+|data/sample_inputs/model\.pt"
)
_PAYLOAD_CONFIGS = {"data/weights/model_weights_config.json": re.compile(r"weight_\d+"),
                    "data/constants/model_constants_config.json": re.compile(r"tensor_\d+")}
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_PROGRAM = "models/model.json"

# Operators a graph may call: ATen, the int8 (de)quantize ops a2k's int8-static recipe writes, and tuple indexing.
_OP_NAMESPACES = ("torch.ops.aten.", "torch.ops.quantized_decomposed.")
_OTHER_TARGETS = {"_operator.getitem"}

# A symbolic shape is parsed by sympy.sympify, which evaluates it as Python: only sympy names, shape symbols
# (s0, u3, ...), numbers, operators and keyword flags may appear.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
    "Gt", "Ge", "And", "Or", "Not", "oo", "zoo", "nan", "True", "False", "floor", "ceiling", "sqrt", "Mod",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "OpaqueUnaryFn_sqrt", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "Identity", "positive", "negative", "integer", "nonnegative", "nonpositive", "real",
    "finite", "zero", "nonzero",
}
_SHAPE_SYMBOL = re.compile(r"[a-z]{1,8}\d+")
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*)|'([a-z]{1,8}\d+)'|(\d+(?:\.\d+)?(?:e-?\d+)?)|(\*\*|//|[-+*/%(),=<>!]))")


class UnsafeArchiveError(ValueError):
    """A .pt2 file holds something `torch.export.load` would unpickle or run as code."""


def load_exported_program(path: str | Path) -> torch.export.ExportedProgram:
    """The program in `path`, read once into memory, checked by `check_exported_archive`, then loaded from
    those same bytes (so the file cannot change between the check and the load)."""
    data = Path(path).read_bytes()
    check_exported_archive(data, str(path))
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers the int8 (quantized_decomposed) ops
    return torch.export.load(io.BytesIO(data))


def check_exported_archive(data: bytes, origin: str) -> None:
    """Raise UnsafeArchiveError (one line naming `origin`) unless `data` is a .pt2 archive whose weights and
    constants are raw tensors, whose sample inputs load with `weights_only=True`, and whose program has no guard
    code, only allowed operators and plain symbolic shapes."""
    records = _records(data, origin)
    for name in records:
        if not _ALLOWED_RECORDS.fullmatch(name):
            _refuse(origin, f"holds {name!r}, which is not a part a2k loads (program JSON, raw tensors, "
                            "their configs, sample inputs)")
    if _PROGRAM not in records:
        _refuse(origin, f"has no {_PROGRAM}; write it with torch.export.save")
    reader = torch._C.PyTorchFileReader(io.BytesIO(data))
    if reader.get_record("archive_format") != b"pt2":
        _refuse(origin, "is not a pt2 archive (its archive_format is not 'pt2')")
    for config, path_name in _PAYLOAD_CONFIGS.items():
        if config in records:
            _check_payload_config(_json(reader, config, origin), path_name, config, origin)
    if _SAMPLE_INPUTS in records:
        try:
            torch.load(io.BytesIO(reader.get_record(_SAMPLE_INPUTS)), weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            _refuse(origin, f"has sample inputs that torch.load(weights_only=True) refuses, which torch.export.load "
                            f"would then unpickle: {_first_line(err)}")
    _check_program(_json(reader, _PROGRAM, origin), origin)


def _records(data: bytes, origin: str) -> list[str]:
    """The record names below the zip's one top folder; a zip with two tops or a name twice is refused, as
    Python's zipfile and PyTorch's reader could then see different files."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile as err:
        _refuse(origin, f"is not a zip archive: {err}")
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) != 1 or any("/" not in name for name in names):
        _refuse(origin, f"has {len(tops)} top-level folders {sorted(tops)[:3]}; torch.export.save writes one")
    if len(set(names)) != len(names):
        _refuse(origin, "names a file twice")
    return [name.split("/", 1)[1] for name in names]


def _json(reader: Any, name: str, origin: str) -> Any:
    try:
        return json.loads(reader.get_record(name))
    except (ValueError, RuntimeError) as err:
        _refuse(origin, f"has an unreadable {name}: {_first_line(err)}")


def _check_payload_config(doc: Any, path_name: re.Pattern, config: str, origin: str) -> None:
    entries = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        _refuse(origin, f"has a {config} without a 'config' table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            _refuse(origin, f"stores {fqn!r} pickled (use_pickle in {config}), which torch.export.load would "
                            "unpickle; only raw tensors are loaded")
        if not path_name.fullmatch(str(meta.get("path_name"))):
            _refuse(origin, f"stores {fqn!r} as {meta.get('path_name')!r}; only raw tensor records are loaded")


def _check_program(program: Any, origin: str) -> None:
    if not isinstance(program, dict):
        _refuse(origin, f"has a {_PROGRAM} that is not a JSON object")
    if program.get("guards_code"):
        _refuse(origin, f"has guard code ({_short(program['guards_code'][0])}), which loading would compile and run "
                        "as Python")
    for key, value in _walk(program):
        if key == "expr_str" and isinstance(value, str):
            _check_expr(value, origin)
        elif key == "target" and isinstance(value, str):
            if not (value.startswith(_OP_NAMESPACES) or value in _OTHER_TARGETS):
                _refuse(origin, f"calls {_short(value)}; allowed: operators under "
                                f"{', '.join(n + '*' for n in _OP_NAMESPACES)} and {', '.join(sorted(_OTHER_TARGETS))}")


def _walk(doc: Any) -> Iterator[tuple[str, Any]]:
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                yield key, value
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def _check_expr(expr: str, origin: str) -> None:
    pos = 0
    while pos < len(expr.rstrip()):
        token = _EXPR_TOKEN.match(expr, pos)
        if token is None:
            _refuse(origin, f"has a symbolic shape {_short(expr)} with {_short(expr[pos:pos + 20])}, which sympy would "
                            "evaluate as Python; allowed: sympy names, shape symbols, numbers and operators")
        name = token.group(1)
        if name and name not in _SYMPY_NAMES and not _SHAPE_SYMBOL.fullmatch(name):
            _refuse(origin, f"has a symbolic shape {_short(expr)} naming {name!r}, which sympy would evaluate as "
                            "Python; allowed: sympy names, shape symbols (s0, u3), numbers and operators")
        pos = token.end()


def _refuse(origin: str, reason: str) -> None:
    raise UnsafeArchiveError(f"refusing torch.export file {origin!r}: it {reason}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return _short(text.splitlines()[0] if text else type(err).__name__)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return repr(text[:limit] + ("…" if len(text) > limit else ""))
