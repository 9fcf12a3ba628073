"""The model stage: the CUDA-graph forward pass gives the eager model's answers (run with -m gpu)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from safetensors.torch import save_file

from tasks.devices import Device
from tasks.models.importers import import_classifier
from tasks.classify.infer import Classifier, fold_batch_norms
from tasks.models.entry import build_model
from tasks.images.preprocess import Preprocessing

SMALL_RESNET_PRE = Preprocessing(resize=72, crop=64)  # resnet18 works at 64x64 and runs fast on a CPU


def _batch_norms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _with_learned_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Batch norms as training leaves them (not the identity a fresh one is), so folding has work to do."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return model.eval()


def test_a_resnet_is_classified_with_its_batch_norms_folded_and_the_same_answers(tmp_path, caplog):
    model = _with_learned_statistics(build_model("resnet18", 3, SMALL_RESNET_PRE))
    save_file(model.state_dict(), str(tmp_path / "resnet.safetensors"))
    import_classifier(tmp_path / "resnet.safetensors", tmp_path / "model", name="resnet", class_names=["a", "b", "c"],
                      preprocessing=SMALL_RESNET_PRE, architecture="resnet18")
    with caplog.at_level(logging.INFO, logger="tasks.classify.infer"):
        folded = Classifier(str(tmp_path / "model"), Device("cpu"))
    as_is = Classifier(str(tmp_path / "model"), Device("cpu"), fold=False)
    assert "resnet: 20 of 20 batch norms folded" in caplog.text
    assert _batch_norms(folded.model) == 0 and _batch_norms(as_is.model) == 20
    x = torch.randn(4, *SMALL_RESNET_PRE.input_shape)
    assert torch.allclose(folded.probabilities(x), as_is.probabilities(x), atol=1e-5)
    assert folded.top_k(x, 2)[1].tolist() == as_is.top_k(x, 2)[1].tolist()


class _BranchesOnValues(torch.nn.Module):
    """Python control flow on a tensor's value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


class _CountsCalls(_BranchesOnValues):
    """A forward pass with state outside its tensors: tracing records one call's count as a constant, so the
    folded copy's output differs from the original's."""

    calls = 0  # on the class: shared by the copy that torch.fx traces

    def forward(self, x):
        type(self).calls += 1
        return self.bn(self.conv(x)) * type(self).calls


@pytest.mark.parametrize("module, says", [(_BranchesOnValues, "cannot be traced"), (_CountsCalls, "output changed")])
def test_a_model_that_cannot_be_folded_faithfully_runs_as_it_is(module, says, caplog):
    model = _with_learned_statistics(module())
    with caplog.at_level(logging.INFO, logger="tasks.classify.infer"):
        assert fold_batch_norms(model, (3, 8, 8), "odd") is model
    assert "odd runs with its batch norms as they are" in caplog.text and says in caplog.text


def test_on_the_cpu_nothing_is_captured(seed_model_dir):
    classifier = Classifier(str(seed_model_dir), Device("cpu"))
    assert classifier.capture(8) is False and classifier.graph is None
    x = torch.randn(3, *classifier.entry.preprocessing.input_shape)
    assert classifier.probabilities(x).shape == (3, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [16, 5], ids=["full", "partial"])
def test_the_cuda_graph_gives_the_eager_answers_for_full_and_partial_batches(seed_model_dir, n):
    classifier = Classifier(str(seed_model_dir), Device("cuda", 0))
    shape = classifier.entry.preprocessing.input_shape
    batches = [torch.randn(n, *shape, device="cuda").half().contiguous(memory_format=torch.channels_last)
               for _ in range(3)]
    eager = [classifier.probabilities(x).clone() for x in batches]
    assert classifier.capture(16)
    for x, expected in zip(batches, eager):  # replayed on new data each time, not the captured zeros
        got = classifier.probabilities(x)
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=2e-3)
    scores, indices = classifier.top_k(batches[0], 1)
    assert indices[:, 0].tolist() == eager[0].argmax(1).tolist()


class _SyncsInForward(torch.nn.Module):
    """A forward pass that reads a value back to the host: it cannot be recorded as a CUDA graph."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out * (1.0 if out.abs().sum().item() >= 0 else 0.0)


@pytest.mark.gpu
def test_a_model_that_cannot_be_captured_runs_eagerly_and_says_so(seed_model_dir, caplog):
    classifier = Classifier(str(seed_model_dir), Device("cuda", 0))
    classifier.model = _SyncsInForward(classifier.model)
    with caplog.at_level(logging.WARNING, logger="tasks.classify.infer"):
        assert classifier.capture(8) is False
    assert "runs eagerly" in caplog.text and classifier.graph is None
    x = torch.randn(8, *classifier.entry.preprocessing.input_shape, device="cuda").half()
    assert classifier.probabilities(x.contiguous(memory_format=torch.channels_last)).shape == (8, 2)


@pytest.mark.parametrize("preset, expected", [(None, "32"), ("4", "4")])
def test_importing_tasks_gives_cuda_32_hardware_queues_unless_the_user_chose(preset, expected):
    """Eight queues (the driver's default) make DALI's streams and the model's wait on each other."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if preset is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, tasks; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
