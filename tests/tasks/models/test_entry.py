import io
import json

import pytest
import torch

from dataclasses import replace

from tasks.models.entry import (
    build_model, check_class_names, check_model_name, default_preprocessing, list_architectures, load_model, read_entry,
    register_architecture, save_model_dir,
)
from tasks.images.preprocess import Preprocessing


def test_every_architecture_builds_and_classifies_its_input_shape():
    for arch in list_architectures():
        pre = default_preprocessing(arch)
        model = build_model(arch, 3, pre).eval()
        with torch.inference_mode():
            assert model(torch.randn(2, *pre.input_shape)).shape == (2, 3)


def test_save_and_load_round_trip_gives_the_same_predictions(tmp_path):
    pre = default_preprocessing("seed-cnn")
    model = build_model("seed-cnn", 4, pre).eval()
    entry = save_model_dir(model, tmp_path / "m", name="m", version="1", architecture="seed-cnn",
                           class_names=list("abcd"), preprocessing=pre, metrics={"test_accuracy": 0.5})
    loaded_entry, loaded = load_model(tmp_path / "m")
    assert loaded_entry == entry and read_entry(tmp_path / "m").metrics == {"test_accuracy": 0.5}
    x = torch.randn(3, *pre.input_shape)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["preprocessing"]["crop"] == 32 and doc["input_signature"]["shape"] == [None, 3, 32, 32]


def test_altered_weights_are_refused_naming_model_and_version(seed_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(seed_model_dir, copy)
    weights = copy / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"model seed version 1: weights sha256 .* truncated or altered"):
        load_model(copy)


def _with_weights_file(src, dest, data: bytes):
    """A copy of model directory `src` whose weights file holds `data`, its sha256 recorded: what a registry
    would hand out had a wrong or damaged file been registered."""
    import shutil

    from tasks.models.entry import save_entry, sha256_file

    shutil.copytree(src, dest)
    weights = dest / "weights.safetensors"
    weights.write_bytes(data)
    save_entry(dest, replace(read_entry(dest), weights_sha256=sha256_file(weights)))
    return weights


def test_weights_of_another_shape_are_one_line_naming_the_file_and_the_shapes(seed_model_dir, tmp_path):
    from safetensors.torch import save

    other = build_model("seed-cnn", 3, default_preprocessing("seed-cnn")).state_dict()  # 3 classes, entry says 2
    weights = _with_weights_file(seed_model_dir, tmp_path / "m", save(other))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"model seed version 1: weights file {str(weights)!r} does not fit seed-cnn with 2 "
                              "classes: shape mismatch: ")
    assert "file has [3, " in message and "seed-cnn with 2 classes expects [2, " in message


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:8] + b"XXXX" + b[12:], "invalid JSON in header"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header too large"),
    (lambda b: b[:5], "header too small"),
])
def test_a_damaged_safetensors_header_is_one_line_naming_the_file(seed_model_dir, tmp_path, damage, reason):
    data = (seed_model_dir / "weights.safetensors").read_bytes()
    weights = _with_weights_file(seed_model_dir, tmp_path / "m", damage(data))
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"model seed version 1: weights file {str(weights)!r} is not a readable "
                                   f"safetensors file: Error while deserializing header: {reason}")


def test_unknown_and_duplicate_architectures_are_refused():
    with pytest.raises(ValueError, match=r"architecture 'resnet9' is not known \(close matches: .*resnet18.*\); give one of: .*seed-cnn"):
        build_model("resnet9", 2, Preprocessing())
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("seed-cnn", Preprocessing())(lambda **kw: None)


def test_torchvision_architectures_refuse_grayscale_input():
    with pytest.raises(ValueError, match="takes 3 input channels, not 1"):
        build_model("resnet18", 2, Preprocessing(mean=(0.5,), std=(0.5,), channels=1))


@pytest.mark.parametrize("name", ["", "../../etc", "a/b", ".hidden", "x" * 200])
def test_model_names_that_could_escape_the_store_are_refused(name):
    with pytest.raises(ValueError, match="model name"):
        check_model_name(name)


def test_preprocessing_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="channels 2"):
        Preprocessing(channels=2)
    with pytest.raises(ValueError, match="crop 300 must be between 1 and resize"):
        Preprocessing(crop=300)
    with pytest.raises(ValueError, match="need 1 value"):
        Preprocessing(channels=1)
    with pytest.raises(ValueError, match="'lanczos' is not a valid Interpolation"):
        Preprocessing(interpolation="lanczos")


def test_class_names_are_checked_in_one_place_naming_their_origin(seed_model_dir):
    assert check_class_names(["cat", "dog"]) == ("cat", "dog")
    entry = read_entry(seed_model_dir)
    with pytest.raises(ValueError, match=r"class_names of model 'seed' repeats \['a'\]"):
        replace(entry, name="seed", class_names=("a", "b", "a"))
    with pytest.raises(ValueError, match=r"has 1 class name\(s\) \['a'\]; a classifier needs at least 2"):
        replace(entry, class_names=("a",))


def test_the_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    import hashlib

    from tasks.models.entry import sha256_file
    from tasks.storage import filesystem, sha256_of

    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    fs, path = filesystem(tmp_path / "blob")
    with fs.open(path, "rb") as f:
        through_fsspec = sha256_of(f)
    assert sha256_file(tmp_path / "blob") == through_fsspec == sha256_of(io.BytesIO(data)) == hashlib.sha256(data).hexdigest()
