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
                                  device=device, batch_size=64)
        assert summary["errors"] == 0 and summary["device"].startswith(device)
        table = pq.read_table(tmp_path / device).sort_by("image_uri")
        rows[device] = table
    gpu, cpu = rows["cuda"], rows["cpu"]
    assert gpu.column("image_uri").equals(cpu.column("image_uri"))
    agree = sum(a == b for a, b in zip(gpu.column("label").to_pylist(), cpu.column("label").to_pylist()))
    assert agree / gpu.num_rows >= 0.99  # fp16 on the GPU vs fp32 on the CPU: ties may flip, nothing more
    scores = abs(gpu.column("score").to_numpy() - cpu.column("score").to_numpy())
    assert scores.max() < 0.02
