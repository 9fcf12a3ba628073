"""Shared fixtures: a Prefect test server for the session, real images, small real models."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

DATA = Path(__file__).resolve().parent / "data"
ODD_IMAGES = DATA / "odd-images"  # Pillow's odd test images, in the repository (README there: origin, licence)
# the photos still come from ../shared (CI has it; a clone does not): a set cut from photographs that ship with
# scikit-learn made DALI's CPU decoder abort the test process once in three runs (bench/NOTES.md, "Test data")
IMAGENET_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu_memory(gib): needs that many GiB free on cuda:0 when the test starts; "
                                       "skipped with what is free otherwise (the card may be shared)")


def needs_gpu_memory(gib: float, device: int = 0) -> None:
    """Skip the calling test unless cuda:`device` has `gib` GiB free now. Tests that size their batch from the
    free memory (batch_size=None, fit_batch_size) or cap it (gpu_memory_gb) fail on a card other processes
    fill ("not even one image fits: 0.07 GiB free"); that says nothing about a2k."""
    if not torch.cuda.is_available():
        pytest.skip(f"needs a CUDA GPU with {gib:g} GiB free")
    free, total = torch.cuda.mem_get_info(device)
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:g} GiB free on cuda:{device}; {free / 2**30:.2f} GiB of {total / 2**30:.1f} GiB "
                    "is free (other processes hold the rest)")


@pytest.fixture(autouse=True)
def _gpu_memory_mark(request):
    """`@pytest.mark.gpu_memory(GIB)`: `needs_gpu_memory(GIB)` before the test's other fixtures run."""
    mark = request.node.get_closest_marker("gpu_memory")
    if mark is not None:
        needs_gpu_memory(*mark.args, **mark.kwargs)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server (SQLite) for the whole session, as Prefect's testing guide does."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def a2k_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own A2K_HOME, so nothing touches ~/.a2k."""
    home = tmp_path / "a2k-home"
    monkeypatch.setenv("A2K_HOME", str(home))
    return home


def photo_paths(n: int) -> list[Path]:
    paths = sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:n]
    if len(paths) < n:
        pytest.fail(f"expected {n} photos in {IMAGENET_SAMPLE}; found {len(paths)}")
    return paths


@pytest.fixture
def photos_dir(tmp_path) -> Path:
    """Nine real photographs in two class folders (5 + 4)."""
    root = tmp_path / "photos"
    for i, src in enumerate(photo_paths(9)):
        dest = root / ("birds" if i < 5 else "fish") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root


@pytest.fixture
def truncated_jpeg(tmp_path) -> bytes:
    data = photo_paths(1)[0].read_bytes()
    return data[: len(data) // 3]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from tasks.train.demo_data import write_digits_dataset

    return write_digits_dataset(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="session")
def seed_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised seed-cnn for two classes (its predictions are arbitrary but deterministic)."""
    from tasks.models.entry import build_model, default_preprocessing, save_model_dir

    torch.manual_seed(0)
    pre = default_preprocessing("seed-cnn")
    directory = tmp_path_factory.mktemp("models") / "seed" / "1"
    save_model_dir(build_model("seed-cnn", 2, pre), directory, name="seed", version="1", architecture="seed-cnn",
                   class_names=["birds", "fish"], preprocessing=pre)
    return directory


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto's server mode) over HTTP on 127.0.0.1, as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """A fresh bucket; the standard AWS variables point s3fs (and child processes) at the test server."""
    import uuid

    import s3fs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"a2k-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def registry_root(request, tmp_path) -> str:
    """The same registry tests on a local folder and on S3."""
    if request.param == "local":
        return str(tmp_path / "registry")
    return f"s3://{request.getfixturevalue('s3_bucket')}/registry"


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - the name http.server calls
        _CountingHandler.requests.append(self.path)
        self.send_response(404)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@dataclass
class HttpServer:
    url: str
    requests: list[str]  # the paths asked for, GET or HEAD


@pytest.fixture
def http_server() -> HttpServer:
    """A local HTTP server that answers 404 and records each request: a uri that must never be fetched."""
    _CountingHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield HttpServer(f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.requests)
    server.shutdown()
    server.server_close()
