"""The flow commands' options come from the flows' signatures: one parameter list, checked before any Prefect work."""

import inspect

import pytest

from a2k.cli import main
from flows.classify_images import classify_images
from flows.demo import demo
from flows.train_model import train_model


@pytest.mark.parametrize("command, flow, positional", [
    ("classify", classify_images, {"input", "output"}), ("train", train_model, {"dataset"}), ("demo", demo, set()),
])
def test_every_flow_parameter_is_an_option_with_its_default(capsys, command, flow, positional):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, p in inspect.signature(flow.fn).parameters.items():
        if name in positional:
            assert f" {name} " in text
            continue
        assert f"--{name.replace('_', '-')}" in text
        if p.default not in (None, False, inspect.Parameter.empty):
            assert f"(default: {getattr(p.default, 'value', p.default)})" in text, name


def test_classify_help_says_what_each_option_means(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "images per shard (one task and one Parquet part each) (default: 4096)" in text
    assert "NAME (= NAME@production)" in text and "s3://bucket/prefix" in text


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "0", "--top-k '0': Input should be greater than or equal to 1"),
    ("--shard-size", "many", "--shard-size 'many': Input should be a valid integer, unable to parse string as an integer"),
    ("--device", "gpu2", "--device 'gpu2': device 'gpu2' is not one of: auto, cpu, cuda, cuda:N"),
])
def test_a_bad_option_is_one_line_naming_it_before_any_work(capsys, tmp_path, option, value, message):
    code = main(["classify", str(tmp_path), str(tmp_path / "out"), "--model", "m", option, value])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"a2k: error: {message}"
    assert not (tmp_path / "out").exists()
