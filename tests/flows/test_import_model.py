"""The import-model flow end to end: a state dict in safetensors for a torchvision architecture (random weights:
nothing can be downloaded here) is registered and classifies real photos; named weights give the preprocessing and
the class names their metadata records."""

import pandas as pd
import pytest
import torch
from prefect.exceptions import ParameterTypeError
from safetensors.torch import save_file

from flows.classify_images import classify_images
from flows.import_model import import_model
from tasks.images.preprocess import Preprocessing
from tasks.models.entry import build_model
from tasks.models.registry import get_model


def _saved(arch: str, classes: int, pre: Preprocessing, path) -> str:
    torch.manual_seed(0)
    save_file(build_model(arch, classes, pre).state_dict(), str(path))
    return str(path)


def test_a_resnet18_state_dict_imports_and_classifies(photos_dir, tmp_path):
    source = _saved("resnet18", 2, Preprocessing(resize=72, crop=64), tmp_path / "resnet18.safetensors")
    (tmp_path / "labels.txt").write_text("birds\nfish\n")
    registry = str(tmp_path / "registry")
    result = import_model(source=source, name="my-resnet", labels=str(tmp_path / "labels.txt"), arch="resnet18",
                          resize=72, crop=64, registry=registry)
    assert result["ref"] == "models:/my-resnet/1"
    entry = get_model("models:/my-resnet/1", registry).entry
    assert entry.architecture == "resnet18" and entry.preprocessing == Preprocessing(resize=72, crop=64)
    summary = classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model="models:/my-resnet/1",
                              device="cpu", registry=registry)
    df = pd.read_parquet(tmp_path / "out")
    assert summary["predicted"] == len(df) == 9 and set(df["label"]) <= {"birds", "fish"}
    assert set(df["model_name"]) == {"my-resnet"} and df["score"].between(0, 1).all()


def test_named_weights_give_preprocessing_and_class_names(photos_dir, tmp_path):
    pre = Preprocessing(resize=232, crop=224)
    source = _saved("regnet_y_400mf", 1000, pre, tmp_path / "regnet.safetensors")
    registry = str(tmp_path / "registry")
    import_model(source=source, name="regnet", arch="regnet_y_400mf:IMAGENET1K_V2", registry=registry)
    entry = get_model("models:/regnet/1", registry).entry
    assert entry.architecture == "regnet_y_400mf" and entry.preprocessing == pre  # from the weights' transforms
    assert entry.num_classes == 1000 and entry.class_names[:2] == ("tench", "goldfish")
    assert entry.lineage["weights"] == "RegNet_Y_400MF_Weights.IMAGENET1K_V2"
    summary = classify_images(input=str(photos_dir), output=str(tmp_path / "out"), model="models:/regnet/1",
                              device="cpu", registry=registry)
    assert summary["predicted"] == 9 and set(pd.read_parquet(tmp_path / "out")["label"]) <= set(entry.class_names)
    import_model(source=source, name="regnet", arch="regnet_y_400mf:IMAGENET1K_V2", resize=256, registry=registry)
    assert get_model("models:/regnet/2", registry).entry.preprocessing.resize == 256  # what is given wins


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "resnet18"}, r"labels are needed: .*arch is 'resnet18'"),
    ({"arch": "resnet19", "labels": "x"}, r"architecture 'resnet19' is not known \(close matches: resnet18"),
    ({"arch": "resnet18:IMAGENET1K_V9"}, r"weights 'IMAGENET1K_V9' are not resnet18's"),
])
def test_bad_imports_are_refused_before_anything_is_registered(tmp_path, kwargs, message):
    source = _saved("resnet18", 2, Preprocessing(), tmp_path / "r.safetensors")
    with pytest.raises((ValueError, ParameterTypeError), match=message):  # Prefect checks the signature's types
        import_model(source=source, name="bad", registry=str(tmp_path / "registry"), **kwargs)
    assert not (tmp_path / "registry").exists()
