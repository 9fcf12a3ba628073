"""The GPU path end to end (run on the GPU machine with `pytest -m gpu`)."""

import pyarrow.parquet as pq
import pytest

from flows.classify_images import classify_images
from flows.train_model import train_model

pytestmark = pytest.mark.gpu


def test_gpu_training_and_fp16_classification_agree_with_the_cpu_path(digits_dir, tmp_path):
    trained = train_model(dataset=str(digits_dir), name="gpu-digits", epochs=8, flip_probability=0.0, device="cuda",
                          registry=str(tmp_path / "reg"))
    assert trained["metrics"]["test_accuracy"] >= 0.95
    test_split = f"{trained['url']}/splits/test.parquet"
    rows = {}
    for device in ("cuda", "cpu"):
        summary = classify_images(input=test_split, output=str(tmp_path / device), model=trained["ref"], registry=str(tmp_path / "reg"),
                                  device=device, batch_size=64, shard_size=96)  # shards overlap on the worker
        assert summary["errors"] == 0 and summary["device"].startswith(device)
        table = pq.read_table(tmp_path / device).sort_by("image_uri")
        rows[device] = table
    gpu, cpu = rows["cuda"], rows["cpu"]
    assert gpu.column("image_uri").equals(cpu.column("image_uri"))
    agree = sum(a == b for a, b in zip(gpu.column("label").to_pylist(), cpu.column("label").to_pylist()))
    assert agree / gpu.num_rows >= 0.99  # fp16 on the GPU vs fp32 on the CPU: ties may flip, nothing more
    scores = abs(gpu.column("score").to_numpy() - cpu.column("score").to_numpy())
    assert scores.max() < 0.02


@pytest.mark.gpu_memory(2)  # the 1.5 GiB cap must be free to be set
def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, caplog):
    """ResNet-50 at batch 512 needs more than 1.5 GiB of activations: with that budget the forward pass
    runs out of memory, halves until it fits, and every image still gets exactly one row."""
    import logging
    import shutil

    import torch

    from bench.run_all import model_dir_for
    from tasks.classify.shard import shard_classifier
    from tests.conftest import photo_paths

    images = tmp_path / "images"
    images.mkdir()
    for i in range(512):
        src = photo_paths(64)[i % 64]
        shutil.copy(src, images / f"{i:04d}_{src.name}")
    _, model = model_dir_for("resnet50", tmp_path)
    with caplog.at_level(logging.WARNING, logger="tasks.classify.shard"):
        summary = classify_images(input=str(images), output=str(tmp_path / "out"), model=str(model), device="cuda",
                                  batch_size=512, gpu_memory_gb=1.5)
    assert summary["predicted"] == 512 and summary["errors"] == 0
    assert "GPU out of memory" in caplog.text
    table = pq.read_table(tmp_path / "out")
    assert table.num_rows == 512 and len(set(table.column("image_uri").to_pylist())) == 512
    shard_classifier.cache_clear()  # drop the worker holding the memory limit before other GPU tests
    torch.cuda.empty_cache()
