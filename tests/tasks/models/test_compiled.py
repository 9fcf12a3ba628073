"""Compiled (AOTInductor) models: where they may run, and a package that cannot load failing cleanly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tasks.devices import Device
from tasks.models.compiled import PackageLoadError, check_runs_here, here, probe_package
from tasks.models.entry import read_entry


def test_a_package_whose_loader_fails_is_refused_with_the_reason_and_the_caller_lives_on(tmp_path):
    broken = tmp_path / "model.pt2"
    broken.write_bytes(b"PK\x03\x04 not a package")
    with pytest.raises(PackageLoadError, match=r"a process loading the compiled package exited 1 \(torch "):
        probe_package(broken, Device("cpu"))


def test_a_compiled_entry_runs_only_on_the_device_arch_and_torch_it_records(seed_model_dir):
    entry = read_entry(seed_model_dir)
    record = {**here(Device("cpu")), "batch_size": 64}
    check_runs_here(replace(entry, lineage={"compiled": record, "parent": "models:/seed/1"}), Device("cpu"))
    for change, said in (({"torch": "2.0.0"}, "with torch 2.0.0"), ({"arch": "x86_64-avx512"}, "cpu x86_64-avx512")):
        moved = replace(entry, lineage={"compiled": {**record, **change}, "parent": "models:/seed/1"})
        with pytest.raises(ValueError, match=f"is compiled for .*{said}.*: classify with models:/seed/1 instead"):
            check_runs_here(moved, Device("cpu"))
    with pytest.raises(ValueError, match="without a complete 'compiled' record"):
        check_runs_here(replace(entry, lineage={"compiled": {"device": "cpu"}}), Device("cpu"))
    assert record["torch"] == torch.__version__
