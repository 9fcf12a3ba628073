"""A .pt2 file that would run code in torch.export.load is refused before anything in it is unpickled or run."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from tasks.compress.export import export_program
from tasks.compress.quant import quantize_static
from tasks.models.entry import WeightsFormat, build_model, default_preprocessing, load_model, write_entry
from tasks.models.exported import UnsafeArchiveError, load_exported_program
from tasks.models.importers import import_classifier
from tests.tasks.models.test_importers import Payload  # unpickling it writes a marker file

PRE = default_preprocessing("seed-cnn")
NAMES = list("abc")


def _pickled(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _a2k_program() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.export.save(export_program(build_model("seed-cnn", len(NAMES), PRE), PRE), buffer)
    return buffer.getvalue()


def _rewrite(data: bytes, edit) -> bytes:
    """The archive with `edit(name, bytes) -> bytes` applied to each record (names relative to the top folder)."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            top, name = info.filename.split("/", 1)
            target.writestr(info.filename, edit(name, source.read(info)))
    return out.getvalue()


def _pickled_weight(name: str, body: bytes, marker: Path) -> bytes:
    if name == "data/weights/model_weights_config.json":
        config = json.loads(body)
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        return json.dumps(config).encode()
    return _pickled(marker) if name == "data/weights/weight_0" else body


def _pickled_sample_inputs(name: str, body: bytes, marker: Path) -> bytes:
    return _pickled(marker) if name == "data/sample_inputs/model.pt" else body  # weights_only fails, torch retries


def _sympy_eval(name: str, body: bytes, marker: Path) -> bytes:
    if name != "models/model.json":
        return body
    text = body.decode()
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text  # the dynamic batch dimension export_program declares
    return text.replace(symbol, f"open('{marker}', 'w') and {symbol}", 1).encode()


def _guard_code(name: str, body: bytes, marker: Path) -> bytes:
    if name != "models/model.json":
        return body
    program = json.loads(body)
    program["guards_code"] = [f"open('{marker}', 'w') is not None"]
    return json.dumps(program).encode()


ATTACKS = {"pickled weight": _pickled_weight, "pickled sample inputs": _pickled_sample_inputs,
           "symbolic shape": _sympy_eval, "guard code": _guard_code}
REASONS = {"pickled weight": "stores 'features.0.weight' pickled", "pickled sample inputs": "has sample inputs that",
           "symbolic shape": "naming 'open'", "guard code": "has guard code"}


def _evil_model_dir(tmp_path: Path, attack: str) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    directory = tmp_path / "evil"
    directory.mkdir()
    data = _rewrite(_a2k_program(), lambda name, body: ATTACKS[attack](name, body, marker))
    (directory / "model.pt2").write_bytes(data)
    write_entry(directory, weights_file="model.pt2", weights_format=WeightsFormat.EXPORTED_PROGRAM, name="evil",
                version="1", architecture="torch.export", class_names=NAMES, preprocessing=PRE)
    return directory, marker


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_registered_program_that_would_run_code_is_refused_and_nothing_runs(tmp_path, attack):
    directory, marker = _evil_model_dir(tmp_path, attack)  # model.json records its correct sha256
    error = None
    try:
        _, model = load_model(directory)
        model(torch.randn(2, *PRE.input_shape))  # guard code would run here
    except Exception as err:  # before the check, torch failed on some attacks only after the payload ran
        error = err
    assert not marker.exists(), f"the {attack} payload ran"
    assert isinstance(error, UnsafeArchiveError), repr(error)
    message = str(error)
    assert "\n" not in message and str(directory / "model.pt2") in message and REASONS[attack] in message


@pytest.mark.parametrize("attack", ["pickled weight", "symbolic shape"])
def test_importing_a_program_that_would_run_code_is_refused_and_nothing_runs(tmp_path, attack):
    directory, marker = _evil_model_dir(tmp_path, attack)
    error = None
    try:
        import_classifier(directory / "model.pt2", tmp_path / "staged", name="evil", class_names=NAMES,
                          preprocessing=PRE)
    except Exception as err:
        error = err
    assert not marker.exists(), f"the {attack} payload ran"
    assert isinstance(error, UnsafeArchiveError), repr(error)
    assert f"refusing torch.export file '{directory / 'model.pt2'}': it " in str(error)
    assert not (tmp_path / "staged").exists()


def test_an_aotinductor_library_in_the_archive_is_refused(tmp_path):
    data = _a2k_program()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        target.writestr("archive/data/aotinductor/model/model.so", b"\x7fELF")
    (tmp_path / "aoti.pt2").write_bytes(out.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"holds 'data/aotinductor/model/model\.so', which is not a part"):
        load_exported_program(tmp_path / "aoti.pt2")


def test_a2k_programs_plain_and_int8_load_and_agree_with_torch(tmp_path):
    torch.manual_seed(0)
    model = build_model("seed-cnn", len(NAMES), PRE).eval()
    x = torch.randn(3, *PRE.input_shape)
    int8, _ = quantize_static(model, torch.randn(8, *PRE.input_shape), 4)
    for name, program in [("plain", export_program(model, PRE)), ("int8", int8)]:
        torch.export.save(program, str(tmp_path / f"{name}.pt2"))
        expected = torch.export.load(str(tmp_path / f"{name}.pt2")).module()(x)
        assert torch.equal(load_exported_program(tmp_path / f"{name}.pt2").module()(x), expected)
