"""The architecture zoo: torchvision's classification models by name, timm's as timm:NAME, preprocessing from
named weights' metadata, and one-line refusals of unknown names with their close matches."""

import pytest
import torch

from tasks.images.preprocess import Preprocessing
from tasks.models.entry import build_model, default_preprocessing, load_model, save_model_dir
from tasks.models.zoo import resolve_architecture, torchvision_names


def test_every_torchvision_classification_model_is_known_by_name():
    assert len(torchvision_names()) >= 80 and {"regnet_y_400mf", "convnext_tiny", "vit_b_16"} <= set(torchvision_names())
    assert resolve_architecture("regnet_y_400mf").name == "regnet_y_400mf"


def test_named_weights_give_their_preprocessing_and_categories():
    spec = resolve_architecture("resnet50:IMAGENET1K_V2")
    assert (spec.name, spec.weights) == ("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    assert spec.preprocessing == Preprocessing(resize=232, crop=224)  # V2's resize, not the built-in 256
    assert len(spec.categories) == 1000 and spec.categories[0] == "tench"
    b0 = resolve_architecture("efficientnet_b0:DEFAULT")
    assert b0.weights == "EfficientNet_B0_Weights.IMAGENET1K_V1" and b0.preprocessing.interpolation.value == "bicubic"
    assert resolve_architecture("resnet50:ResNet50_Weights.IMAGENET1K_V1").preprocessing == Preprocessing()


def test_built_in_architectures_keep_their_preprocessing_and_zoo_ones_take_their_default_weights():
    assert resolve_architecture("resnet50").preprocessing == Preprocessing()  # unchanged: 256/224 bilinear
    assert resolve_architecture("efficientnet_b0").preprocessing == Preprocessing()
    inception = resolve_architecture("inception_v3").preprocessing
    assert (inception.resize, inception.crop) == (342, 299)  # the input size inception_v3 is built for


@pytest.mark.parametrize("name, message", [
    ("resnet19", r"^architecture 'resnet19' is not known \(close matches: resnet18, .*\); give one of: .*seed-cnn.*"
                 r"torchvision's \d+ classification models"),
    ("mobilenetv3_small", r"close matches: mobilenet_v3_small, mobilenet_v3_large"),
    ("resnet50:IMAGENET1K_V3", r"^weights 'IMAGENET1K_V3' are not resnet50's \(close: IMAGENET1K_V2, IMAGENET1K_V1\); "
                               r"ResNet50_Weights has: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT$"),
    ("seed-cnn:V1", r"architecture 'seed-cnn' in 'seed-cnn:V1' is not a torchvision classification model"),
    ("resnt50:DEFAULT", r"architecture 'resnt50' is not known \(close matches: resnet50"),
    ("quux", r"architecture 'quux' is not known \(no close match\)"),
])
def test_unknown_names_are_refused_in_one_line_with_close_matches(name, message):
    with pytest.raises(ValueError, match=message) as caught:
        resolve_architecture(name)
    assert "\n" not in str(caught.value)


def test_a_zoo_model_saves_and_loads_without_pickle(tmp_path):
    pre = Preprocessing(resize=72, crop=64)
    torch.manual_seed(0)
    model = build_model("squeezenet1_1", 3, pre).eval()
    save_model_dir(model, tmp_path / "m", name="sq", version="1", architecture="squeezenet1_1",
                   class_names=["a", "b", "c"], preprocessing=pre)
    entry, loaded = load_model(tmp_path / "m")
    x = torch.randn(2, *pre.input_shape)
    with torch.inference_mode():
        assert entry.architecture == "squeezenet1_1" and torch.allclose(model(x), loaded(x), atol=1e-5)


def test_a_torchvision_vit_is_built_for_the_crop_it_is_given():
    model = build_model("vit_b_16", 2, Preprocessing(resize=36, crop=32)).eval()
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)  # built for 224, it would refuse 32x32


def test_timm_models_by_name_with_their_pretrained_config(tmp_path):
    pytest.importorskip("timm", reason="timm is an optional extra: pip install 'a2k[timm]'")
    pre = default_preprocessing("timm:test_vit")
    assert (pre.crop, pre.mean, pre.interpolation.value) == (160, (0.5, 0.5, 0.5), "bicubic")  # timm's pretrained_cfg
    torch.manual_seed(0)
    model = build_model("timm:test_vit", 2, pre).eval()
    save_model_dir(model, tmp_path / "m", name="tv", version="1", architecture="timm:test_vit",
                   class_names=["a", "b"], preprocessing=pre)
    _, loaded = load_model(tmp_path / "m")
    x = torch.randn(1, *pre.input_shape)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)
    with pytest.raises(ValueError, match=r"'timm:resnet10x' is not a timm model \(close matches: timm:resnet10t"):
        resolve_architecture("timm:resnet10x")
