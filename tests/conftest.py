"""Shared fixtures: a Prefect test server for the session, real images, small real models.

Nothing here reads outside the repository and the installed packages (`../shared` is for bench/ only), and nothing
touches the user's Prefect state: the session, and every process a test starts, has a Prefect home of its own.
"""

from __future__ import annotations

import atexit
import http.server
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Prefect reads its settings (PREFECT_HOME: its database, results, profiles) when it is imported: before that, the
# user's PREFECT_* variables go (an API URL, a profile, a home) and PREFECT_HOME is a folder of this session's, which
# every process the tests start inherits. (A test subprocess once ran on ~/.prefect/prefect.db and left a run
# "Running" in the user's UI.)
if "prefect" in sys.modules:
    raise RuntimeError("prefect was imported before tests/conftest.py set a temporary PREFECT_HOME; the tests would "
                       "use the user's Prefect state")
USER_PREFECT_HOME = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
for _name in [k for k in os.environ if k.startswith("PREFECT_")]:
    del os.environ[_name]
PREFECT_HOME = Path(tempfile.mkdtemp(prefix="a2k-tests-prefect-home-"))
atexit.register(shutil.rmtree, PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = str(PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

DATA = Path(__file__).resolve().parent / "data"
ODD_IMAGES = DATA / "odd-images"  # Pillow's odd test images, in the repository (README there: origin, licence)
# the real photographs the tests' photo set is cut from (tests/data/README.md): scikit-learn's two sample photos
# (installed with it; CC BY 2.0, sklearn/datasets/images/README.txt) and two of Pillow's test photos in the odd corpus
PHOTO_SOURCES = [Path(__import__("sklearn").__file__).parent / "datasets" / "images" / name
                 for name in ("china.jpg", "flower.jpg")] + [ODD_IMAGES / "flower2.jpg", ODD_IMAGES / "hopper.jpg"]
N_PHOTOS = 500


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

    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine took over 120 s
        yield


@pytest.fixture(autouse=True)
def a2k_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own A2K_HOME, so nothing touches ~/.a2k."""
    home = tmp_path / "a2k-home"
    monkeypatch.setenv("A2K_HOME", str(home))
    return home


def _cut_photos():
    """The tests' photos, one at a time, the same on every machine: JPEGs of ImageNet-like size (long side 320-512
    px) cut from PHOTO_SOURCES by seeded crops, flips and scales, written at qualities 70-95, every 7th progressive,
    every 5th 4:4:4, every 9th with an EXIF block. Yields (file name, encoded bytes)."""
    import io

    from PIL import Image

    rng = random.Random(0)
    sources = [Image.open(s).convert("RGB") for s in PHOTO_SOURCES]
    for i in range(N_PHOTOS):
        src = sources[i % len(sources)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.55, 1.0)), int(h * rng.uniform(0.55, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        photo = src.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.uniform(320, 512) / max(photo.size)
        photo = photo.resize((max(8, round(photo.width * scale)), max(8, round(photo.height * scale))),
                             Image.Resampling.BICUBIC)
        options = {"quality": rng.randint(70, 95), "progressive": i % 7 == 3, "subsampling": 0 if i % 5 == 1 else 2}
        if i % 9 == 4:
            exif = Image.Exif()
            exif[0x0131] = "a2k tests"  # Software
            options["exif"] = exif.tobytes()
        encoded = io.BytesIO()
        photo.save(encoded, "JPEG", **options)
        yield f"photo-{i:03d}-{PHOTO_SOURCES[i % len(PHOTO_SOURCES)].stem}.JPEG", encoded.getvalue()


class _PhotoSet:
    """The photos cut so far, in a folder of this process's (removed at exit); more are cut as tests ask."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.paths: list[Path] = []
        self._cutter = _cut_photos()

    def first(self, n: int) -> list[Path]:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="a2k-test-photos-"))
            atexit.register(shutil.rmtree, self.folder, True)
        while len(self.paths) < n:
            name, data = next(self._cutter)
            (path := self.folder / name).write_bytes(data)
            self.paths.append(path)
        return self.paths[:n]


_PHOTOS = _PhotoSet()


def photo_paths(n: int) -> list[Path]:
    """The first `n` of the tests' real photos (at most N_PHOTOS), as files; the same files for every test of the
    session: copy them before changing them."""
    if not 0 <= n <= N_PHOTOS:
        pytest.fail(f"the tests' photo set has {N_PHOTOS} photos; {n} asked for")
    return _PHOTOS.first(n)


def many_photos_in(root: Path, n: int, distinct: int) -> Path:
    """`n` copies of the first `distinct` photos under `root`, in three class folders (class0..2), each name unique:
    a run long enough (many small shards) for a test to act on it mid-way."""
    for i in range(n):
        src = photo_paths(distinct)[i % distinct]
        dest = root / f"class{i % 3}" / f"{i:03d}_{src.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs mounted for the test, unmounted after it."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root and CAP_SYS_ADMIN needed): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


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
