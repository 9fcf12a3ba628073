"""`a2k tune`'s decode profile: measured on real photos, kept per card, and taken by a run for what it leaves unset."""

from __future__ import annotations

import json

import pytest

from tasks.devices import Device
from tasks.images.tune import load_profile, profile_path, tune_decoder
from tasks.targets import plan_budget
from tests.conftest import photo_paths


def test_a_profile_measured_here_sets_what_a_run_leaves_unset_and_the_log_says_so(a2k_home):
    cpu = Device("cpu")
    assert load_profile(cpu) is None
    lines: list[str] = []
    profile = tune_decoder([str(p) for p in photo_paths(8)], cpu, images=8, repeats=1, say=lines.append)
    assert profile.path == str(profile_path(cpu)) and profile_path(cpu).is_relative_to(a2k_home)
    tried = {(t["num_threads"], t["batch_size"]) for t in profile.trials}
    assert len(lines) == len(profile.trials) == len(tried) >= 2  # each setting timed once, each said
    assert all(t["images_per_second"] > 0 for t in profile.trials)
    c = profile.chosen
    assert (c.num_threads, c.batch_size) in tried and c.hw_decoder_load == 0.0  # no hardware decoder on the CPU
    assert load_profile(cpu) == profile

    budget = plan_budget(None, cpu, None, None, None)
    assert budget.num_threads == c.num_threads
    assert budget.batch_size == (c.batch_size if c.batch_size < 256 else None)  # 256: the largest that fits
    assert "decode profile of" in budget.decoder and profile.card in budget.decoder
    given = plan_budget(None, cpu, 1, 0.3, None, 64)  # what the run gives is kept
    assert (given.num_threads, given.hw_decoder_load, given.batch_size) == (1, 0.3, 64)
    assert given.decoder == "decoder settings as given"


def test_a_profile_file_a2k_did_not_write_is_refused_naming_it(a2k_home):
    path = profile_path(Device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"card": "x"}))
    with pytest.raises(ValueError, match=f"decode profile {path} cannot be read"):
        load_profile(Device("cpu"))
