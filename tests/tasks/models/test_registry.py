import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest
import torch

from tasks.models.entry import Status, load_model
from tasks.models.registry import (
    ModelRef, alias_history, archive, as_model_ref, delete_alias, fetch_model, get_model, lineage, list_models, register_model,
    resolve_model, rollback_alias, set_alias,
)


def test_references_parse_and_print_back():
    assert ModelRef.parse("models:/digits/3") == ModelRef("digits", version=3)
    assert ModelRef.parse("models:/digits@production") == ModelRef("digits", alias="production")
    assert ModelRef.parse("models:/digits/latest") == ModelRef.parse("models:/digits") == ModelRef("digits")
    for text in ("models:/digits/3", "models:/digits@production", "models:/digits/latest"):
        assert str(ModelRef.parse(text)) == text


@pytest.mark.parametrize("text, message", [
    ("digits/3", "is not models:/NAME/VERSION"), ("models:/../../etc/1", "is not models:/"),
    ("models:/ok/0", "positive"), ("models:/ok/x", "whole number"), ("models:/ok@Prod", "alias 'Prod'"),
    ("models:/ok@latest", "alias 'latest'"), ("models:/.hidden/1", "model name"),
])
def test_bad_references_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        ModelRef.parse(text)


def test_a_bare_name_is_its_production_alias():
    assert as_model_ref("digits") == ModelRef("digits", alias="production")
    assert as_model_ref("models:/digits/3") == ModelRef.parse("models:/digits/3")
    for text in ("digits/3", "../etc", ""):
        with pytest.raises(ValueError, match=r"is not models:/NAME/VERSION, .* or a bare NAME"):
            as_model_ref(text)


def test_register_get_list_and_latest(seed_model_dir, registry_root):
    v1 = register_model(seed_model_dir, "seed", registry_root)
    v2 = register_model(seed_model_dir, "seed", registry_root)
    assert (v1.entry.version, v2.entry.version) == ("1", "2")
    assert get_model("models:/seed/latest", registry_root).entry.version == "2"
    assert get_model("models:/seed/1", registry_root).entry.weights_sha256 == v1.entry.weights_sha256
    assert [str(v.ref) for v in list_models(registry_root)] == ["models:/seed/1", "models:/seed/2"]
    rejected = register_model(seed_model_dir, "seed", registry_root, Status.REJECTED, "accuracy dropped 3 points")
    assert rejected.status is Status.REJECTED and rejected.status_reason == "accuracy dropped 3 points"
    assert get_model("models:/seed/latest", registry_root).entry.version == "2"  # latest skips rejected
    with pytest.raises(FileNotFoundError, match="has no version 9; versions: 1, 2, 3"):
        get_model("models:/seed/9", registry_root)


def test_aliases_move_keep_history_and_roll_back(seed_model_dir, registry_root):
    for _ in range(3):
        register_model(seed_model_dir, "seed", registry_root)
    set_alias("seed", "production", 1, registry_root)
    set_alias("seed", "production", 3, registry_root)
    assert get_model("models:/seed@production", registry_root).entry.version == "3"
    assert get_model("models:/seed/3", registry_root).aliases == ("production",)
    assert rollback_alias("seed", "production", registry_root).entry.version == "1"
    assert [e["version"] for e in alias_history("seed", "production", registry_root)] == [1, 3, 1]
    delete_alias("seed", "production", registry_root)
    with pytest.raises(FileNotFoundError, match="has no alias 'production'; aliases: none"):
        get_model("models:/seed@production", registry_root)


def test_archived_and_rejected_versions_take_no_alias(seed_model_dir, registry_root):
    register_model(seed_model_dir, "seed", registry_root)
    register_model(seed_model_dir, "seed", registry_root, Status.REJECTED, "too slow")
    with pytest.raises(ValueError, match="version 2 is rejected \\(too slow\\)"):
        set_alias("seed", "candidate", 2, registry_root)
    set_alias("seed", "production", 1, registry_root)
    with pytest.raises(ValueError, match="carries alias\\(es\\) production"):
        archive("seed", 1, "replaced", registry_root)
    delete_alias("seed", "production", registry_root)
    assert archive("seed", 1, "replaced", registry_root).status is Status.ARCHIVED
    with pytest.raises(FileNotFoundError, match="no ready version"):
        get_model("models:/seed/latest", registry_root)


def test_a_version_is_fetched_verified_and_loads(seed_model_dir, registry_root):
    info = register_model(seed_model_dir, "seed", registry_root)
    set_alias("seed", "production", 1, registry_root)
    resolved, local = resolve_model("seed", registry_root)  # a bare name means @production
    assert resolved.ref == info.ref
    _, original = load_model(seed_model_dir)
    entry, loaded = load_model(local)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(original(x), loaded(x))
    assert entry.version == "1" and entry.name == "seed"


def test_tampered_weights_in_the_registry_are_refused(seed_model_dir, registry_root):
    info = register_model(seed_model_dir, "seed", registry_root)
    from tasks.storage import filesystem

    fs, path = filesystem(f"{info.url}/weights.safetensors")
    data = fs.cat_file(path)
    fs.pipe_file(path, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="model seed version 1: weights sha256 .* truncated or altered"):
        load_model(fetch_model(info, registry_root))


def test_weights_linked_from_outside_the_registry_are_refused(seed_model_dir, tmp_path):
    registry = str(tmp_path / "registry")
    info = register_model(seed_model_dir, "seed", registry)
    outside = tmp_path / "elsewhere.safetensors"  # the same bytes: the digest alone would pass it
    outside.write_bytes((seed_model_dir / "weights.safetensors").read_bytes())
    weights = tmp_path / "registry" / "seed" / "1" / "weights.safetensors"
    weights.unlink()
    weights.symlink_to(outside)
    with pytest.raises(ValueError, match=r"model seed version 1: weights.safetensors in '.*registry/seed/1' resolves "
                                         r"to '.*elsewhere.safetensors', outside its model directory"):
        load_model(fetch_model(info, registry))


def test_a_version_folder_linked_from_outside_the_registry_is_refused(seed_model_dir, tmp_path):
    import shutil

    registry = tmp_path / "registry"
    register_model(seed_model_dir, "seed", str(registry))
    shutil.move(registry / "seed" / "1", tmp_path / "planted")
    (registry / "seed" / "1").symlink_to(tmp_path / "planted", target_is_directory=True)
    info = get_model("models:/seed/1", str(registry))
    with pytest.raises(ValueError, match=r"models:/seed/1: '.*registry/seed/1' resolves to '.*planted', outside the "
                                         r"registry"):
        fetch_model(info, str(registry))
    with pytest.raises(ValueError, match="outside the registry"):
        resolve_model("models:/seed/1", str(registry))


def test_lineage_walks_back_to_the_root(seed_model_dir, registry_root, tmp_path):
    import shutil

    register_model(seed_model_dir, "seed", registry_root)
    child_dir = tmp_path / "child"
    shutil.copytree(seed_model_dir, child_dir)
    doc = json.loads((child_dir / "model.json").read_text())
    doc["lineage"] = {"parent": "models:/seed/1", "recipe": "fp16"}
    (child_dir / "model.json").write_text(json.dumps(doc))
    register_model(child_dir, "seed-fp16", registry_root)
    assert [str(v.ref) for v in lineage("models:/seed-fp16/1", registry_root)] == ["models:/seed-fp16/1", "models:/seed/1"]


def _race(root: str, staging: str, start_at: float, worker: int) -> list[int]:
    """One racing process: wait for the common start, then register twice and move the alias each time."""
    while time.time() < start_at:
        time.sleep(0.001)
    versions = []
    for _ in range(2):
        v = int(register_model(staging, "racer", root).entry.version)
        set_alias("racer", "candidate", v, root)
        versions.append(v)
    return versions


def test_racing_processes_get_distinct_versions_and_lose_no_alias_move(seed_model_dir, registry_root):
    workers = 4
    start_at = time.time() + 6  # time for the spawned interpreters to import torch
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_race, [registry_root] * workers, [str(seed_model_dir)] * workers,
                                [start_at] * workers, range(workers)))
    got = sorted(v for r in results for v in r)
    assert got == list(range(1, 2 * workers + 1))  # every registration has its own version, none lost
    assert [str(v.ref) for v in list_models(registry_root, "racer")] == [f"models:/racer/{v}" for v in got]
    moves = alias_history("racer", "candidate", registry_root)
    assert sorted(m["version"] for m in moves) == got  # every alias move is in the history
    assert [m["seq"] for m in moves] == list(range(1, 2 * workers + 1))
    assert get_model("models:/racer@candidate", registry_root).entry.version == str(moves[-1]["version"])
