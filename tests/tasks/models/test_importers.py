import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.models.importers import SourceKind, detect_source_kind, import_classifier, read_labels
from tasks.models.prefect_tasks import import_classifier_task
from tasks.models.entry import (
    WeightsFormat, build_model, default_preprocessing, load_model, read_entry, sha256_file, verify_weights,
)
from tasks.images.preprocess import Preprocessing

SEED_PRE = default_preprocessing("seed-cnn")
SMALL_RESNET_PRE = Preprocessing(resize=72, crop=64)  # resnet18 works at 64x64 and runs fast on a CPU


def _leave_mark(path: str) -> str:
    Path(path).write_text("the pickled payload ran")
    return "ran"


class Payload:
    """Unpickling this calls `_leave_mark`: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_mark, (self.marker,))


def _seed_cnn(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(num_classes)
    return build_model("seed-cnn", num_classes, SEED_PRE).eval()


def _assert_same_predictions(original: torch.nn.Module, staging: Path, pre: Preprocessing) -> None:
    _, loaded = load_model(staging)
    x = torch.randn(3, *pre.input_shape)
    with torch.inference_mode():
        assert torch.allclose(original(x), loaded(x), rtol=0, atol=1e-6)


def _import(source, tmp_path, names=("a", "b", "c"), pre=SEED_PRE, **kwargs):
    return import_classifier(source, tmp_path / "staged", name="imported", class_names=list(names),
                             preprocessing=pre, **kwargs)


def test_safetensors_state_dict_round_trip_records_its_source(tmp_path):
    model = _seed_cnn(3)
    source = tmp_path / "seed.safetensors"
    save_file(model.state_dict(), str(source))
    entry = _import(source, tmp_path, architecture="seed-cnn", lineage_extra={"origin": "unit test"})
    assert (entry.version, entry.architecture, entry.weights_format) == ("0", "seed-cnn", WeightsFormat.STATE_DICT)
    assert entry.lineage == {"recipe": "import", "source": str(source), "source_sha256": sha256_file(source),
                             "source_kind": "safetensors", "parent": None, "origin": "unit test"}
    assert read_entry(tmp_path / "staged") == entry
    _assert_same_predictions(model, tmp_path / "staged", SEED_PRE)


def test_resnet18_state_dict_saved_with_torch_save_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, SMALL_RESNET_PRE).eval()
    source = tmp_path / "resnet.pth"
    torch.save(model.state_dict(), source)
    entry = _import(source, tmp_path, pre=SMALL_RESNET_PRE, architecture="resnet18")
    assert entry.lineage["source_kind"] == SourceKind.TORCH_STATE_DICT.value
    _assert_same_predictions(model, tmp_path / "staged", SMALL_RESNET_PRE)


@pytest.mark.parametrize("wrapper_key", ["state_dict", "model"])
def test_checkpoint_with_wrapped_dataparallel_state_dict_round_trip(tmp_path, wrapper_key):
    torch.manual_seed(1)
    model = build_model("resnet18", 3, SMALL_RESNET_PRE).eval()
    state = {f"module.{k}": v for k, v in torch.nn.DataParallel(model).module.state_dict().items()}
    source = tmp_path / "checkpoint.pt"
    torch.save({wrapper_key: state, "epoch": 7, "best_top1": 0.81}, source)
    _import(source, tmp_path, pre=SMALL_RESNET_PRE, architecture="resnet18")
    _assert_same_predictions(model, tmp_path / "staged", SMALL_RESNET_PRE)


@pytest.mark.parametrize("how, suffix", [("script", ".pt"), ("trace", ".ts"), ("script", ".pth")])
def test_torchscript_is_stored_as_is_and_round_trips(tmp_path, how, suffix):
    model = _seed_cnn(3)
    example = torch.randn(1, *SEED_PRE.input_shape)
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
    source = tmp_path / f"seed{suffix}"
    torch.jit.save(scripted, str(source))
    entry = _import(source, tmp_path, architecture="ignored-for-torchscript")
    assert (entry.architecture, entry.weights_format) == ("torchscript", WeightsFormat.TORCHSCRIPT)
    assert entry.weights_sha256 == entry.lineage["source_sha256"] == sha256_file(source)
    _assert_same_predictions(model, tmp_path / "staged", SEED_PRE)


def _export_seed_cnn(model: torch.nn.Module, path: Path, dynamic_batch: bool = True) -> None:
    example = (torch.randn(2, *SEED_PRE.input_shape),)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    torch.export.save(torch.export.export(model, example, dynamic_shapes=shapes), str(path))


def test_exported_program_is_stored_as_is_with_the_same_predictions(tmp_path):
    model = _seed_cnn(3)
    source = tmp_path / "seed.pt2"
    _export_seed_cnn(model, source)
    entry = _import(source, tmp_path)
    assert (entry.architecture, entry.weights_format) == ("torch.export", WeightsFormat.EXPORTED_PROGRAM)
    assert entry.weights_sha256 == sha256_file(source)
    loaded = torch.export.load(str(verify_weights(tmp_path / "staged", entry))).module()
    x = torch.randn(3, *SEED_PRE.input_shape)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), rtol=0, atol=1e-6)


def test_exported_program_loads_with_load_model(tmp_path):
    model = _seed_cnn(3)
    _export_seed_cnn(model, tmp_path / "seed.pt2")
    _import(tmp_path / "seed.pt2", tmp_path)
    _assert_same_predictions(model, tmp_path / "staged", SEED_PRE)


def test_state_dict_for_another_number_of_classes_names_both_shapes(tmp_path):
    source = tmp_path / "resnet10.pth"
    torch.save(build_model("resnet18", 10, SMALL_RESNET_PRE).state_dict(), source)
    expected = r"fc\.weight: file has \[10, 512\], resnet18 with 3 classes expects \[3, 512\]"
    with pytest.raises(ValueError, match=expected) as err:
        _import(source, tmp_path, pre=SMALL_RESNET_PRE, architecture="resnet18")
    assert str(source) in str(err.value)
    assert not (tmp_path / "staged").exists()


def test_state_dict_of_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    source = tmp_path / "seed.safetensors"
    save_file(_seed_cnn(3).state_dict(), str(source))
    expected = (r"does not fit resnet18 with 3 classes: missing from the file: conv1\.weight, bn1\.weight, bn1\.bias "
                r"\(and 119 more\); not in the model: classifier\.1\.bias")
    with pytest.raises(ValueError, match=expected):
        _import(source, tmp_path, pre=SMALL_RESNET_PRE, architecture="resnet18")


def test_state_dict_without_architecture_is_refused_naming_the_known_ones(tmp_path):
    source = tmp_path / "seed.safetensors"
    save_file(_seed_cnn(3).state_dict(), str(source))
    with pytest.raises(ValueError, match=r"say which architecture.*\(one of .*resnet18.*seed-cnn.*, a torchvision classification model or timm:NAME\)"):
        _import(source, tmp_path)


def test_unknown_architecture_is_refused(tmp_path):
    source = tmp_path / "seed.pth"
    torch.save(_seed_cnn(3).state_dict(), source)
    with pytest.raises(ValueError, match=r"architecture 'resnet9' is not known \(close matches: resnet50, resnet34, resnet18.*\); give one of: .*seed-cnn"):
        _import(source, tmp_path, architecture="resnet9")


def test_pickled_objects_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "payload-ran"
    source = tmp_path / "evil.pth"
    torch.save({"x": Payload(marker), "w": torch.zeros(2)}, source)
    with pytest.raises(ValueError, match=r"evil\.pth.*pickled Python objects.*weights_only=True"):
        _import(source, tmp_path, architecture="seed-cnn")
    assert not marker.exists() and not (tmp_path / "staged").exists()
    torch.load(source, weights_only=False)  # the payload is real: an unrestricted load runs it
    assert marker.read_text() == "the pickled payload ran"


def test_torch_save_of_non_tensors_is_not_a_state_dict(tmp_path):
    source = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, source)
    with pytest.raises(ValueError, match=r"entry 'epoch' is a int, not a tensor"):
        _import(source, tmp_path, architecture="seed-cnn")


def test_torchscript_with_another_number_of_classes_is_refused(tmp_path):
    source = tmp_path / "seed4.pt"
    torch.jit.save(torch.jit.script(_seed_cnn(4)), str(source))
    with pytest.raises(ValueError, match=r"seed4\.pt' gives output \[1, 4\] for an input of shape \[1, 3, 32, 32\]; "
                                         r"3 class names need \[1, 3\]"):
        _import(source, tmp_path)


def test_exported_program_with_a_fixed_batch_size_is_refused(tmp_path):
    source = tmp_path / "fixed.pt2"
    model = _seed_cnn(3)
    torch.export.save(torch.export.export(model, (torch.randn(1, *SEED_PRE.input_shape),)), str(source))
    with pytest.raises(ValueError, match=r"fails on an input of shape \[2, 3, 32, 32\] \(exported with a fixed batch"):
        _import(source, tmp_path)


def test_file_kinds_are_decided_by_suffix_and_archive_contents(tmp_path):
    torch.save(_seed_cnn(3).state_dict(), tmp_path / "sd.pt")
    torch.jit.save(torch.jit.script(_seed_cnn(3)), str(tmp_path / "ts.pt"))
    assert detect_source_kind(tmp_path / "sd.pt") is SourceKind.TORCH_STATE_DICT
    assert detect_source_kind(tmp_path / "ts.pt") is SourceKind.TORCHSCRIPT
    (tmp_path / "sd.pt").rename(tmp_path / "sd.ts")
    with pytest.raises(ValueError, match=r"sd\.ts' is not a TorchScript archive"):
        detect_source_kind(tmp_path / "sd.ts")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match=r"suffix '\.onnx' is not one of \.safetensors, \.pt, \.pth"):
        detect_source_kind(tmp_path / "m.onnx")
    (tmp_path / "ts.pt").rename(tmp_path / "ts.pt2")
    with pytest.raises(ValueError, match=r"ts\.pt2' is not a torch.export archive"):
        detect_source_kind(tmp_path / "ts.pt2")


def test_staging_directory_must_be_empty(tmp_path):
    source = tmp_path / "seed.safetensors"
    save_file(_seed_cnn(3).state_dict(), str(source))
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "leftover.txt").write_text("x")
    with pytest.raises(ValueError, match=r"staging directory .* is not empty; it holds leftover\.txt"):
        _import(source, tmp_path, architecture="seed-cnn")


def test_lineage_extra_cannot_overwrite_the_recorded_source(tmp_path):
    source = tmp_path / "seed.safetensors"
    save_file(_seed_cnn(3).state_dict(), str(source))
    with pytest.raises(ValueError, match="lineage_extra may not set parent, source_sha256"):
        _import(source, tmp_path, architecture="seed-cnn", lineage_extra={"parent": "x", "source_sha256": "0"})


def test_labels_one_per_line_or_a_json_list(tmp_path):
    (tmp_path / "labels.txt").write_text("  cat\n\ndog \nbird\n\n")
    (tmp_path / "labels.json").write_text(json.dumps(["cat", "dog"]))
    assert read_labels(tmp_path / "labels.txt") == ["cat", "dog", "bird"]
    assert read_labels(tmp_path / "labels.json") == ["cat", "dog"]


@pytest.mark.parametrize("file_name, text, message", [
    ("dup.txt", "cat\ndog\ncat\n", r"dup\.txt' repeats \['cat'\]; each class must appear once"),
    ("one.txt", "cat\n\n", r"one\.txt' has 1 class name\(s\) \['cat'\]; a classifier needs at least 2"),
    ("obj.json", '{"0": "cat", "1": "dog"}', r"obj\.json' must hold a JSON list of non-empty strings"),
])
def test_bad_labels_files_are_refused_naming_the_file(tmp_path, file_name, text, message):
    (tmp_path / file_name).write_text(text)
    with pytest.raises(ValueError, match=message):
        read_labels(tmp_path / file_name)


def test_import_task_stages_a_model_the_registry_accepts(tmp_path):
    from prefect.logging import disable_run_logger

    from tasks.models.registry import register_model

    model = _seed_cnn(2)
    torch.jit.save(torch.jit.script(model), str(tmp_path / "seed.pt"))
    (tmp_path / "labels.txt").write_text("birds\nfish\n")
    with disable_run_logger():
        result = import_classifier_task.fn(str(tmp_path / "seed.pt"), str(tmp_path / "staged"), "seed",
                                           str(tmp_path / "labels.txt"), SEED_PRE.to_dict())
    assert result["source_kind"] == "torchscript" and result["weights_sha256"] == sha256_file(tmp_path / "seed.pt")
    info = register_model(tmp_path / "staged", registry=str(tmp_path / "registry"))
    assert info.entry.version == "1" and info.entry.lineage["recipe"] == "import"
