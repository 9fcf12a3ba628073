"""The recipe set is stated once, by the config classes: the parser's "allowed:" text, the CLI's help and the handler
table follow them, and option values are converted to each field's annotated type."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from tasks.compress.recipes import (
    RECIPES, Fp16Config, PruneConfig, RecipeConfig, allowed_recipes, parse_recipe, recipe_usage,
)


@dataclass(frozen=True)
class _ResizeConfig(RecipeConfig):
    """A recipe that does not exist: what a new one gets without anyone writing its help."""

    name: ClassVar[str] = "resize"
    positional: ClassVar[str] = "size"
    rank: ClassVar[int] = 0
    size: int = 64
    antialias: bool = True


def _spellings(cls: type[RecipeConfig]) -> list[str]:
    """What the text about `cls` must contain: its name, its positional value, each field with its default."""
    shown = [f"{f.name}={str(f.default).lower() if isinstance(f.default, bool) else f.default}"
             for f in dataclasses.fields(cls)]
    return [cls.name, *([f"{cls.name}:{cls.positional.upper()}"] if cls.positional else []), *shown]


def _cli_recipe_help(capsys, monkeypatch) -> str:
    from a2k import cli_compress

    monkeypatch.setenv("COLUMNS", "10000")  # one line, so no name is split where argparse wraps
    parser = argparse.ArgumentParser(prog="a2k")
    cli_compress.add_parsers(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_field_of_every_recipe_is_in_the_allowed_text_and_the_cli_help(name, capsys, monkeypatch):
    with pytest.raises(ValueError) as refused:
        parse_recipe("int9")
    texts = {"allowed": allowed_recipes(), "refusal": str(refused.value), "cli": _cli_recipe_help(capsys, monkeypatch)}
    for where, text in texts.items():
        missing = [s for s in _spellings(RECIPES[name]) if s not in text]
        assert not missing, f"{where} text lacks {missing}: {text}"


def test_a_new_recipe_or_field_appears_in_the_listing_and_parses_without_more_code(monkeypatch):
    assert recipe_usage(_ResizeConfig) == "resize:SIZE[,KEY=VALUE] (defaults: size=64, antialias=true)"
    assert recipe_usage(Fp16Config) == "fp16"
    assert "resize" not in allowed_recipes()
    monkeypatch.setitem(RECIPES, "resize", _ResizeConfig)
    assert allowed_recipes().startswith("distill:ARCH") and "resize:SIZE[,KEY=VALUE]" in allowed_recipes()
    assert parse_recipe("resize:32,antialias=false") == _ResizeConfig(32, False)


def test_option_values_are_converted_to_each_field_s_type():
    cfg = parse_recipe("prune:0.3,epochs=2,distill=true,round_to=8,learning_rate=1e-4")
    assert cfg == PruneConfig(ratio=0.3, epochs=2, learning_rate=1e-4, distill=True, round_to=8)
    assert [type(getattr(cfg, k)) for k in ("ratio", "epochs", "distill", "round_to")] == [float, int, bool, int]
    assert parse_recipe("export,onnx=false,parity_images=8").onnx is False


@pytest.mark.parametrize("text, message", [
    ("prune:0.3,distill=maybe", "value 'maybe' in recipe 'prune:0.3,distill=maybe' is not a bool (option 'distill' "
                                "of recipe 'prune'); allowed: prune:RATIO[,KEY=VALUE] (defaults: ratio=0.3,"),
    ("prune:0.3,round_to=8.5", "value '8.5' in recipe 'prune:0.3,round_to=8.5' is not an int (option 'round_to' "
                               "of recipe 'prune'); allowed: prune:RATIO"),
    ("export:many", "value 'many' in recipe 'export:many' is not an int (option 'parity_images' of recipe 'export'); "
                    "allowed: export:PARITY_IMAGES[,KEY=VALUE] (defaults: parity_images=32, max_abs_diff=0.001"),
])
def test_a_bad_option_value_is_one_line_naming_recipe_option_value_and_what_is_allowed(text, message):
    with pytest.raises(ValueError) as refused:
        parse_recipe(text)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_every_recipe_has_one_handler_registered_beside_its_code(monkeypatch):
    from tasks.compress import apply
    from tasks.compress.quant import cast_fp16

    handlers = apply.load_handlers()
    assert set(handlers) == set(RECIPES.values()) and handlers[Fp16Config] is cast_fp16
    with pytest.raises(ValueError, match="Fp16Config already has a handler: cast_fp16"):
        apply.recipe_handler(Fp16Config)(lambda candidate, cfg, ctx: {})
    monkeypatch.setitem(RECIPES, "resize", _ResizeConfig)
    with pytest.raises(TypeError, match="no handler registered for _ResizeConfig"):
        apply.load_handlers()


def test_importing_the_recipes_imports_neither_torch_nor_a_handler():
    code = ("import sys, tasks.compress.recipes, a2k.cli_compress; "
            "print(sorted(m for m in ('torch', 'pydantic', 'tasks.compress.apply', 'tasks.compress.quant') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[3]).stdout
    assert out.strip() == "[]"
