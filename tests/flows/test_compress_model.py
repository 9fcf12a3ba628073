"""The compress-model flow and `a2k compress` on a seed-cnn really trained on the demo digits: each recipe's child
is registered, loads, classifies the parent's test split, and passes or fails the gate as its numbers say."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from prefect.artifacts import Artifact

from a2k.cli import main
from flows.classify_images import classify_images
from flows.compress_model import compress_model
from tasks.models.entry import WeightsFormat, load_model
from tasks.models.registry import fetch_model, get_model, list_models
from tests.tasks.compress.test_recipes import trained_registry  # noqa: F401  (the trained parent, copied per test)


def _check_outcome(result: dict, registry: str) -> None:
    """Status, alias and reason follow the measured drop; the child was measured on the parent's test split."""
    parent, child = result["parent_measures"], result["child_measures"]
    drop = (parent["top1"] - child["top1"]) * 100
    assert result["accuracy_drop_points"] == pytest.approx(drop)
    assert parent["images"] == child["images"] == 269 and child["errors"] == 0
    info = get_model(result["child"], registry)
    assert info.entry.lineage["parent"] == "models:/digits/1" == result["parent"]
    assert [c["recipe"] for c in info.entry.lineage["chain"]] == [r.split(":")[0].split(",")[0] if not
                                                                 r.startswith("sparse") else r for r in result["recipes"]]
    assert info.entry.metrics["top1"] == child["top1"] and info.entry.metrics["parent_top1"] == parent["top1"]
    aliases = get_model("models:/digits/1", registry)  # the registry's view of the parent stays intact
    assert aliases.status.value == "ready"
    speedup = child["images_per_second"] / parent["images_per_second"]
    assert result["speedup"] == pytest.approx(speedup) and info.entry.lineage["gate"]["speedup"] == result["speedup"]
    if drop <= 1.0 and speedup >= result["min_speedup"]:
        assert result["passed"] and info.status.value == "ready" and "candidate" in info.aliases
    else:
        assert not result["passed"] and info.status.value == "rejected" and info.aliases == ()
        assert (f"dropped {drop:.2f} points" if drop > 1.0 else "not fast enough") in info.status_reason


def _classifies(result: dict, registry: str) -> torch.Tensor:
    from tasks.models.registry import fetch_model

    info = get_model(result["child"], registry)
    entry, model = load_model(fetch_model(info, registry))
    logits = model.float()(torch.zeros(3, 3, 32, 32))  # as the classify path runs it on the CPU
    assert logits.shape == (3, 10)
    return entry


def test_prune_then_fp16_is_smaller_by_measured_parameters_and_flops(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["prune:0.3,epochs=1", "fp16"], device="cpu",
                            registry=trained_registry)
    _check_outcome(result, trained_registry)
    entry = _classifies(result, trained_registry)
    assert entry.weights_format is WeightsFormat.EXPORTED_PROGRAM  # a pruned shape travels as a program
    p, c = result["parent_measures"], result["child_measures"]
    assert c["parameters"] < 0.6 * p["parameters"] and c["flops"] < 0.6 * p["flops"]
    assert c["weights_bytes"] < 0.35 * p["weights_bytes"]  # half the parameters, half the bytes each
    prune_step = result["steps"][0]
    assert prune_step["parameters_after"] == c["parameters"] and len(prune_step["fine_tune"]) == 1
    assert c["peak_gpu_memory_bytes"] is None
    rows = {r["measure"]: r for r in result["comparison"]}
    assert rows["peak GPU memory (MiB)"]["child"] == "n/a" and rows["parameters"]["parent"] == "356,810"
    artifact = Artifact.get(f"compress-model-digits-v{result['child'].rsplit('/', 1)[1]}")
    assert artifact is not None and "GFLOPs / image" in str(artifact.data)


def test_int8_weights_child_is_4x_smaller_on_disk(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["int8-weights"], device="cpu", registry=trained_registry)
    _check_outcome(result, trained_registry)
    assert _classifies(result, trained_registry).weights_format is WeightsFormat.INT8_WEIGHTS
    assert result["child_measures"]["weights_bytes"] < result["parent_measures"]["weights_bytes"] / 3.5


def test_int8_static_child_is_a_quantized_cpu_program(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["int8-static:64"], device="cpu",
                            registry=trained_registry)
    _check_outcome(result, trained_registry)
    assert _classifies(result, trained_registry).weights_format is WeightsFormat.EXPORTED_PROGRAM
    assert result["steps"][0]["quantized_layers"] == 5 and result["steps"][0]["calibration_images"] == 64
    assert result["child_measures"]["weights_bytes"] < result["parent_measures"]["weights_bytes"] / 2.5


def test_export_stores_a_program_and_onnx_after_parity(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["export:16"], device="cpu", min_speedup=0,
                            registry=trained_registry)
    _check_outcome(result, trained_registry)
    assert result["passed"] and result["accuracy_drop_points"] == pytest.approx(0.0, abs=1e-9)
    step = result["steps"][0]
    assert step["program"]["top1_agreement"] == 1.0 and step["onnx"]["top1_agreement"] == 1.0
    url = get_model(result["child"], trained_registry).url
    import onnx

    onnx.checker.check_model(onnx.load(f"{url}/model.onnx"))
    assert _classifies(result, trained_registry).weights_format is WeightsFormat.EXPORTED_PROGRAM


def test_an_accuracy_collapse_is_registered_rejected_and_said_so(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["prune:0.9,epochs=0"], device="cpu",
                            registry=trained_registry)
    _check_outcome(result, trained_registry)
    assert not result["passed"] and result["status"] == "rejected" and result["alias"] is None
    assert "top-1 accuracy dropped" in result["reason"]
    with pytest.raises(FileNotFoundError, match="has no alias 'candidate'"):
        get_model("models:/digits@candidate", trained_registry)
    assert get_model("models:/digits/latest", trained_registry).entry.version == "1"  # rejected is never latest


def test_cli_compress_bf16_prints_side_by_side_and_refuses_what_a_target_cannot_run(trained_registry, capsys):
    code = main(["compress", "models:/digits/1", "--recipe", "bf16", "--device", "cpu", "--target", "a2000-12gb",
                 "--batch-size", "64", "--registry", trained_registry])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "models:/digits/1 -> models:/digits/2 (bf16) on cpu" in out
    assert "size on disk (MB)      1.428" in out and "x0.500" in out
    info = get_model("models:/digits/2", trained_registry)
    assert ("PASSED: models:/digits/2 is now candidate" in out) == (info.status.value == "ready")
    assert info.entry.lineage["target"]["name"] == "a2000-12gb"
    from safetensors import safe_open

    with safe_open(f"{info.url}/weights.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}

    assert main(["compress", "models:/digits/1", "--recipe", "int8-static", "--target", "a2000", "--device", "cpu",
                 "--registry", trained_registry]) == 2
    assert "'int8-static' runs on cpu only; target 'a2000' is cuda" in capsys.readouterr().err
    assert main(["compress", "models:/digits/1", "--recipe", "int4", "--registry", trained_registry]) == 2
    assert "recipe 'int4' is not known; allowed: distill:ARCH" in capsys.readouterr().err
    assert main(["compress", "models:/digits/1", "--recipe", "sparse-2:4", "--device", "cpu", "--json",
                 "--registry", trained_registry]) == 2
    assert "'sparse-2:4' runs on cuda only; device cpu is cpu" in capsys.readouterr().err
    assert [v.entry.version for v in list_models(trained_registry)] == ["1", "2"]


def test_compile_child_is_an_aoti_package_that_classifies_and_is_refused_where_it_was_not_built(
        trained_registry, tmp_path):
    result = compress_model(model="models:/digits/1", recipes=["compile"], device="cpu", batch_size=64, min_speedup=0,
                            registry=trained_registry)
    _check_outcome(result, trained_registry)  # the child classified all 269 test images through the classify flow
    info = get_model(result["child"], trained_registry)
    assert info.entry.weights_format is WeightsFormat.AOTI_PACKAGE and info.entry.weights_file == "model.aoti.pt2"
    compiled = info.entry.lineage["compiled"]
    assert compiled["device"] == "cpu" and compiled["batch_size"] == 64 and compiled["torch"] == torch.__version__
    assert compiled["parameters"] == result["parent_measures"]["parameters"] == result["child_measures"]["parameters"]
    parity = result["steps"][0]["parity"]
    assert parity["images"] == 256 and parity["top1_agreement"] >= 0.995 and parity["rel_diff"] < 1e-4
    assert result["accuracy_drop_points"] == pytest.approx(0.0, abs=0.4)
    child_dir = fetch_model(info, trained_registry)
    _, model = load_model(child_dir)
    parent = load_model(fetch_model(get_model("models:/digits/1", trained_registry), trained_registry))[1]
    x = torch.rand(70, 3, 32, 32)  # more than one compiled batch, and a padded remainder
    with torch.inference_mode():
        assert torch.allclose(model(x), parent(x), atol=1e-3)

    # the same package where it was not built (here: an entry saying another card): refused before any work
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(child_dir, elsewhere)
    doc = json.loads((elsewhere / "model.json").read_text())
    doc["lineage"]["compiled"] |= {"device": "cuda", "arch": "sm_86"}
    (elsewhere / "model.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    test_split = get_model("models:/digits/1", trained_registry).url + "/splits/test.parquet"
    message = (re.escape(f"model digits v{info.entry.version} is compiled for cuda sm_86 with torch "
                         f"{torch.__version__}; this run has cpu ") + ".*: classify with models:/digits/1 instead")
    with pytest.raises(ValueError, match=message):
        classify_images(input=test_split, output=str(out), model=str(elsewhere), device="cpu")
    assert not list(out.rglob("*.parquet"))


def test_distill_trains_a_smaller_architecture_against_the_parent(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["distill:tiny-cnn,epochs=3"], device="cpu",
                            batch_size=64, min_speedup=0, max_accuracy_drop=100, registry=trained_registry)
    _check_outcome(result, trained_registry)
    info = get_model(result["child"], trained_registry)
    assert info.entry.architecture == "tiny-cnn" and info.entry.weights_format is WeightsFormat.STATE_DICT
    step = result["steps"][0]
    assert step["student"] == "tiny-cnn" and step["teacher"] == "seed-cnn" and len(step["fine_tune"]) == 3
    p, c = result["parent_measures"], result["child_measures"]
    assert c["flops"] == step["flops_after"] < 0.4 * p["flops"] and c["parameters"] < 0.4 * p["parameters"]
    assert c["top1"] > 0.5  # it learned the digits (chance is 0.1) from the parent's split and soft predictions
    assert _classifies(result, trained_registry).architecture == "tiny-cnn"


def test_a_child_too_slow_for_the_gate_is_rejected_with_its_numbers(trained_registry):
    result = compress_model(model="models:/digits/1", recipes=["fp16"], device="cpu", min_speedup=1000,
                            registry=trained_registry)
    _check_outcome(result, trained_registry)
    assert not result["passed"] and "not fast enough" in result["reason"] and "needs at least x1000" in result["reason"]
    info = get_model(result["child"], trained_registry)
    assert info.status.value == "rejected" and info.entry.metrics["speedup"] == pytest.approx(result["speedup"])
    assert info.entry.lineage["gate"]["min_speedup"] == 1000 and info.entry.lineage["gate"]["measured"] == "on cpu"
