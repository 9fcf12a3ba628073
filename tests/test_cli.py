"""The command line, called in-process as a user would type it."""

import argparse
import json

import pytest

from a2k.cli import _parser, main, subparsers
from tasks.models.registry import get_model, register_model


@pytest.fixture
def registry(tmp_path, seed_model_dir) -> str:
    root = str(tmp_path / "registry")
    for _ in range(2):
        register_model(seed_model_dir, "seed", root)
    return root


def _json(capsys, argv) -> object:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_models_list_show_promote_rollback(capsys, registry):
    listed = _json(capsys, ["models", "list", "--registry", registry, "--json"])
    assert [v["ref"] for v in listed] == ["models:/seed/1", "models:/seed/2"]
    assert main(["models", "promote", "models:/seed/1", "--alias", "production", "--registry", registry]) == 0
    assert main(["models", "promote", "models:/seed/latest", "--alias", "production", "--registry", registry]) == 0
    assert "seed@production -> version 2" in capsys.readouterr().out
    shown = _json(capsys, ["models", "show", "models:/seed@production", "--registry", registry, "--json"])
    assert shown["ref"] == "models:/seed/2" and [m["version"] for m in shown["alias_history"]["production"]] == [1, 2]
    assert shown["lineage_chain"] == ["models:/seed/2"] and shown["entry"]["architecture"] == "seed-cnn"
    assert main(["models", "rollback", "seed", "--alias", "production", "--registry", registry]) == 0
    capsys.readouterr()
    assert get_model("models:/seed@production", registry).entry.version == "1"
    assert main(["models", "list", "--registry", registry]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "VER", "STATUS"] and "production" in table[1]


def test_archive_and_errors_exit_2_with_the_reason(capsys, registry):
    assert main(["models", "archive", "models:/seed/1", "--reason", "old", "--registry", registry]) == 0
    assert get_model("models:/seed/1", registry).status.value == "archived"
    capsys.readouterr()
    assert main(["models", "promote", "models:/seed/1", "--registry", registry]) == 2
    assert "version 1 is archived (old)" in capsys.readouterr().err
    assert main(["models", "show", "models:/seed/7", "--registry", registry]) == 2
    assert "has no version 7; versions: 1, 2" in capsys.readouterr().err
    assert main(["models", "show", "seed/7", "--registry", registry]) == 2
    assert "is not models:/NAME/VERSION" in capsys.readouterr().err


def test_a_bare_name_means_its_production_version_in_every_models_command(capsys, registry):
    assert main(["models", "show", "seed", "--registry", registry]) == 2
    assert "model 'seed' has no alias 'production'" in capsys.readouterr().err
    assert main(["models", "promote", "models:/seed/2", "--registry", registry]) == 0
    capsys.readouterr()
    assert _json(capsys, ["models", "show", "seed", "--registry", registry, "--json"])["ref"] == "models:/seed/2"
    assert main(["models", "promote", "seed", "--alias", "candidate", "--registry", registry]) == 0
    assert "seed@candidate -> version 2" in capsys.readouterr().out
    assert main(["models", "archive", "seed", "--registry", registry]) == 2
    assert "carries alias(es) production, candidate" in capsys.readouterr().err


def test_classify_refuses_a_bad_batch_size_before_any_work(capsys, photos_dir, seed_model_dir, tmp_path):
    code = main(["classify", str(photos_dir), str(tmp_path / "out"), "--model", str(seed_model_dir),
                 "--batch-size", "0", "--device", "cpu"])
    assert code == 2 and "--batch-size '0'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_classify_refuses_an_unknown_target_before_any_work(capsys, photos_dir, seed_model_dir, tmp_path):
    code = main(["classify", str(photos_dir), str(tmp_path / "out"), "--model", str(seed_model_dir),
                 "--target", "a3000", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "target 'a3000' is not known; available: a2000, a2000-12gb, h100, t4, x86-cpu" in err
    assert not (tmp_path / "out").exists()


def test_classify_with_a_cuda_target_on_the_cpu_is_refused_before_any_work(capsys, photos_dir, seed_model_dir,
                                                                           tmp_path):
    code = main(["classify", str(photos_dir), str(tmp_path / "out"), "--model", str(seed_model_dir),
                 "--target", "a2000", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "target 'a2000' emulates a CUDA card and needs a CUDA device; the device is cpu" in err
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_train_refuses_an_unknown_architecture_in_one_line_with_close_matches(capsys, photos_dir, tmp_path):
    code = main(["train", str(photos_dir), "--name", "m", "--arch", "mobilenet_v3_smal", "--registry",
                 str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--arch 'mobilenet_v3_smal': architecture 'mobilenet_v3_smal' is not known (close matches: " \
           "mobilenet_v3_small" in err
    assert not (tmp_path / "reg").exists()


def test_models_import_takes_the_class_names_of_named_weights_or_asks_for_labels(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    from tasks.images.preprocess import Preprocessing
    from tasks.models.entry import build_model

    torch.manual_seed(0)
    save_file(build_model("squeezenet1_1", 1000, Preprocessing()).state_dict(), str(tmp_path / "sq.safetensors"))
    registry = str(tmp_path / "reg")
    base = ["models", "import", str(tmp_path / "sq.safetensors"), "--name", "sq", "--registry", registry]
    assert main([*base, "--arch", "squeezenet1_1"]) == 2
    assert "labels are needed" in capsys.readouterr().err
    assert main([*base, "--arch", "squeezenet1_1:IMAGENET1K_V1"]) == 0
    entry = get_model("models:/sq/1", registry).entry
    assert entry.num_classes == 1000 and entry.lineage["weights"] == "SqueezeNet1_1_Weights.IMAGENET1K_V1"


def test_models_list_keeps_its_columns_with_several_aliases(capsys, registry):
    for alias in ("production", "candidate", "nightly-eval"):
        assert main(["models", "promote", "models:/seed/2", "--alias", alias, "--registry", registry]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--registry", registry]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert "candidate,nightly-eval,production" in rows[1], rows
    for column, cell in (("ARCH", "seed-cnn"), ("TEST ACC", " MB")):  # each row's cell starts where its column does
        assert {row.index(cell) + (len(cell) + 2 if cell == " MB" else 0) for row in rows} == {header.index(column)}


@pytest.mark.parametrize("command", sorted(subparsers(_parser(None))) + [""])
def test_every_option_of_every_command_has_help_and_shows_its_default(capsys, command):
    words = command.split()
    parser = subparsers(_parser(words[0]))[command] if words else _parser(None)
    with pytest.raises(SystemExit):
        main([*words, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help and len(action.help) > 8, (command, action.dest)
        if action.default not in (None, False, "", argparse.SUPPRESS):
            default = action.default
            shown = " ".join(map(str, default)) if isinstance(default, list) else getattr(default, "value", default)
            assert f"(default: {shown})" in text, (command, action.dest)
