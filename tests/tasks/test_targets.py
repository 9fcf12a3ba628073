"""Target profiles and the budget a run keeps to on a bigger card (`--target`)."""

from __future__ import annotations

import pytest

from tasks.devices import Device
from tasks.targets import TARGETS, Budget, get_target, green_context_sms, plan_budget


def test_every_cuda_target_says_what_an_emulated_run_needs():
    for t in TARGETS.values():
        if t.device == "cuda":
            assert t.sm_count and t.fp16_tensor_tflops and t.memory_bandwidth_gbs and t.host_cores >= 1, t.name
    a2000 = get_target("a2000")
    assert (a2000.sm_count, a2000.fp16_tensor_tflops, a2000.memory_gib, a2000.hw_jpeg_decoder) == (26, 32, 6, False)
    assert a2000.to_dict()["host_cores"] == 8


@pytest.mark.parametrize("wanted, cc, card_sms, sms", [
    (5, 9.0, 132, 8),     # an A2000's tensor work on an H200: 4.3 SMs, and Hopper splits by 8
    (9, 9.0, 132, 16),
    (26, 8.6, 26, 26),    # never more than the card has
    (3, 8.0, 108, 4),     # Ampere: at least 4, in steps of 2
    (7, 8.0, 108, 8),
    (1, 7.5, 40, 2),
])
def test_green_context_sizes_follow_the_card_s_split_rules(wanted, cc, card_sms, sms):
    assert green_context_sms(wanted, cc, card_sms) == sms


def test_without_a_target_the_budget_is_the_parameters_as_given():
    budget = plan_budget(None, Device("cpu"), 4, 0.3, None)
    assert budget == Budget(None, None, 0.3, 4, None, decoder=budget.decoder)
    assert "no decode profile" in budget.decoder  # nothing measured in this test's A2K_HOME


def test_a_cuda_target_on_the_cpu_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^target 'a2000' emulates a CUDA card and needs a CUDA device; the device "
                                         r"is cpu \(the target is cuda\)$"):
        plan_budget("a2000", Device("cpu"), None, 0.65, None)
    with pytest.raises(ValueError, match="target 'a3000' is not known; available: a2000, a2000-12gb, h100, t4"):
        plan_budget("a3000", Device("cpu"), None, 0.65, None)


@pytest.mark.gpu
def test_on_a_bigger_card_the_a2000_budget_caps_memory_decoder_threads_and_sms():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    props = torch.cuda.get_device_properties(0)
    budget = plan_budget("a2000", Device("cuda", 0), 16, 0.65, None)
    assert budget.gpu_memory_gb == 6 and budget.hw_decoder_load == 0 and budget.num_threads == 8
    if props.major == 9:  # Hopper: 8 SMs, the smallest split, about twice an A2000's tensor throughput
        assert budget.model_sms == 8 and "smallest split" in budget.note
    assert plan_budget("a2000", Device("cuda", 0), 4, 0.65, 3).num_threads == 4  # tighter given values stay
    assert plan_budget("a2000", Device("cuda", 0), 4, 0.65, 3).gpu_memory_gb == 3
