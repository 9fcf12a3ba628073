"""The model stage: the CUDA-graph forward pass gives the eager model's answers (run with -m gpu)."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from a2k.devices import Device
from tasks.infer import Classifier


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
    with caplog.at_level(logging.WARNING, logger="tasks.infer"):
        assert classifier.capture(8) is False
    assert "runs eagerly" in caplog.text and classifier.graph is None
    x = torch.randn(8, *classifier.entry.preprocessing.input_shape, device="cuda").half()
    assert classifier.probabilities(x.contiguous(memory_format=torch.channels_last)).shape == (8, 2)


@pytest.mark.parametrize("preset, expected", [(None, "32"), ("4", "4")])
def test_importing_a2k_gives_cuda_32_hardware_queues_unless_the_user_chose(preset, expected):
    """Eight queues (the driver's default) make DALI's streams and the model's wait on each other."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if preset is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = preset
    out = subprocess.run([sys.executable, "-c", "import os, a2k; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
