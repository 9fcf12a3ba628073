"""An S3 endpoint that takes no connection (a closed local port) is said in one line as unreachable, naming where it
was set, for an input and for an output; not as a missing bucket or prefix, and not with a traceback."""

import os
import socket
import subprocess
import sys

import pytest

from flows.params import check_input_source, check_output_target
from tasks.storage import EndpointUnreachable


@pytest.fixture
def closed_endpoint(monkeypatch) -> str:
    with socket.socket() as s:  # a port just free: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    for name, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "a2k-test", "AWS_SECRET_ACCESS_KEY": "a2k-test"
                        }.items():
        monkeypatch.setenv(name, value)
    return url


EXPECTED = "the S3 endpoint set in AWS_ENDPOINT_URL could not be reached (connection refused at port"


@pytest.mark.parametrize("check, url", [(check_input_source, "s3://bucket/photos"),
                                        (check_input_source, "s3://bucket/list.parquet"),
                                        (check_output_target, "s3://bucket/out")])
def test_an_unreachable_endpoint_is_named_as_such_in_one_line(closed_endpoint, check, url):
    with pytest.raises(EndpointUnreachable) as raised:
        check(url)
    assert str(raised.value).startswith(EXPECTED) and "\n" not in str(raised.value)
    assert closed_endpoint not in str(raised.value)  # the endpoint stays out of logs, as redact() keeps it


@pytest.mark.parametrize("args", [["s3://bucket/photos", "OUT"], ["IN", "s3://bucket/out"]])
def test_the_cli_says_it_in_one_line(closed_endpoint, photos_dir, seed_model_dir, tmp_path, args):
    args = [str(photos_dir) if a == "IN" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    done = subprocess.run([sys.executable, "-m", "a2k", "classify", *args, "--model", str(seed_model_dir)],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [f"a2k: error: {EXPECTED} "
                                                f"{closed_endpoint.rsplit(':', 1)[1]}); check that the store is "
                                                "running and the address is right"]
