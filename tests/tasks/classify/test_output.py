import pickle
from pathlib import Path

import cloudpickle
import pytest

from tasks.classify.output import Output, is_part, is_temporary, part_name
from tasks.classify.sink import PREDICTION_SCHEMA, committed_parts, remove_temporaries, write_part
from tasks.storage import _temporary_name


def test_a_local_output_gives_every_path_of_the_layout(tmp_path):
    out = Output(str(tmp_path / "out"))
    root = str(tmp_path / "out")
    assert (out.root, out.url_of(out.root)) == (root, root)
    assert out.manifest == f"{root}/_a2k/manifest.parquet"
    assert out.work == f"{root}/_a2k/work.parquet"
    assert out.state == f"{root}/_a2k/state/images.parquet"
    assert out.pending == f"{root}/_a2k/state/pending.json"
    assert out.marker == f"{root}/_a2k_run.json"
    name = part_name("000001-abc")
    assert name == "part-000001-abc.parquet"
    assert (out.part(name), out.part(name, errors=True)) == (f"{root}/{name}", f"{root}/_errors/{name}")
    probe = out.new_probe()
    assert probe.startswith(f"{root}/_a2k/.write-probe-") and probe != out.new_probe()


def test_an_s3_output_gives_paths_in_the_bucket_and_urls_back():
    out = Output("s3://bucket/some/prefix/")
    assert out.root == "bucket/some/prefix"
    assert out.state == "bucket/some/prefix/_a2k/state/images.parquet"
    assert out.url_of(out.marker) == "s3://bucket/some/prefix/_a2k_run.json"


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps])
def test_an_output_travels_to_a_worker_as_its_url(tmp_path, dumps):
    out = Output(str(tmp_path / "out"))
    back = pickle.loads(dumps(out))
    assert back == out and back.url == out.url and back.fs is out.fs  # rebuilt from the URL (fsspec's instance)


def test_part_and_temporary_names_are_told_apart(tmp_path):
    out = Output(str(tmp_path / "out"))
    write_part(PREDICTION_SCHEMA.empty_table(), out, part_name("000000-abc"))
    leftover = Path(_temporary_name(out.fs, out.part(part_name("000001-def"))))  # what write_atomic writes first
    leftover.write_bytes(b"half")
    assert committed_parts(out) == {"part-000000-abc.parquet"}
    assert is_temporary(leftover.name) and not is_part(leftover.name)
    assert remove_temporaries(out) == [leftover.name] and not leftover.exists()
