import os
import shutil

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from PIL import Image

from tasks.images.listing import image_suffixes
from tasks.images.manifest import NOT_FOUND, describe_skipped, list_images, make_shards, skipped_counts, write_manifest
from tasks.images.read import Blob, Failure, load_blobs
from tests.conftest import photo_paths


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_lists_image_suffixes_recursively_case_insensitively_and_sorted(tmp_path):
    for rel in ["b/z.JPG", "a/y.png", "a/sub/x.WebP", "top.tiff", "a/notes.txt", "a/.hidden.jpg", "c/q.Bmp", "c/r.tif",
                "c/s.jpeg"]:
        _touch(tmp_path / rel)
    table = list_images(tmp_path)
    rel = [os.path.relpath(u, tmp_path) for u in table.column("uri").to_pylist()]
    assert rel == ["a/sub/x.WebP", "a/y.png", "b/z.JPG", "c/q.Bmp", "c/r.tif", "c/s.jpeg", "top.tiff"]
    assert table.column("bytes").to_pylist() == [1] * 7


def test_links_to_files_are_listed_but_links_to_folders_and_dangling_links_are_not(tmp_path):
    _touch(tmp_path / "src" / "a.jpg")
    _touch(tmp_path / "elsewhere" / "b.jpg")
    (tmp_path / "src" / "linked.jpg").symlink_to(tmp_path / "src" / "a.jpg")
    (tmp_path / "src" / "gone.jpg").symlink_to(tmp_path / "src" / "missing.jpg")
    (tmp_path / "src" / "folder.jpg").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "src" / "outside.jpg").symlink_to(tmp_path / "elsewhere" / "b.jpg")  # outside the input: followed
    table = list_images(tmp_path / "src")
    assert table.column("uri").to_pylist() == [str(tmp_path / "src" / n) for n in ("a.jpg", "linked.jpg", "outside.jpg")]


def test_every_skipped_entry_is_counted_by_kind_and_the_counts_travel_with_the_manifest(tmp_path):
    src = tmp_path / "src"
    _touch(src / "cat" / "a.jpg")
    for rel in ["notes.txt", "cat/more.TXT", "cat/meta.json", "photo.jpeg.gz", "README", "cat/.hidden.jpg"]:
        _touch(src / rel)
    (src / "gone.jpg").symlink_to(src / "missing.jpg")  # dangling
    (src / "loop.jpg").symlink_to(src / "loop.jpg")  # a link to itself: stat fails with ELOOP
    (src / "dogs").symlink_to(tmp_path, target_is_directory=True)  # not followed
    table = list_images(src)
    assert [os.path.relpath(u, src) for u in table.column("uri").to_pylist()] == ["cat/a.jpg"]
    counts = {".txt": 2, ".gz": 1, ".json": 1, "dangling symlink": 1, "hidden": 1, "link to a folder": 1,
              "no suffix": 1, "symlink loop": 1}
    assert skipped_counts(table) == counts and list(skipped_counts(table)) == sorted(counts, key=lambda k: (-counts[k], k))
    assert describe_skipped(skipped_counts(table)) == ("skipped 9 files: .txt 2, .gz 1, .json 1, dangling symlink 1, "
                                                       "hidden 1, link to a folder 1, no suffix 1, symlink loop 1")
    write_manifest(table, tmp_path / "manifest.parquet")
    assert skipped_counts(pq.read_table(tmp_path / "manifest.parquet")) == counts
    assert skipped_counts(list_images(tmp_path / "manifest.parquet")) == {}  # a manifest's own rows skip nothing


def test_a_subfolder_that_cannot_be_read_is_logged_and_the_rest_listed(tmp_path, caplog, monkeypatch):
    _touch(tmp_path / "ok" / "a.jpg")
    _touch(tmp_path / "locked" / "b.jpg")
    scandir = os.scandir

    def refuse_locked(path):  # chmod 0 stops no one when the tests run as root: refuse as the kernel would
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse_locked)
    table = list_images(tmp_path)
    assert [os.path.basename(u) for u in table.column("uri").to_pylist()] == ["a.jpg"]
    assert "skipped folder" in caplog.text and "locked: Permission denied" in caplog.text
    assert skipped_counts(table) == {"unreadable folder": 1}


def test_label_comes_from_the_class_folder_only_at_class_depth(tmp_path):
    _touch(tmp_path / "cat" / "1.jpg")
    _touch(tmp_path / "cat" / "deeper" / "2.jpg")
    _touch(tmp_path / "3.jpg")
    labels = dict(zip([os.path.relpath(u, tmp_path) for u in list_images(tmp_path).column("uri").to_pylist()],
                      list_images(tmp_path).column("label").to_pylist()))
    assert labels == {"cat/1.jpg": "cat", "cat/deeper/2.jpg": None, "3.jpg": None}


def test_parquet_manifest_of_bare_uris_is_completed_from_the_files(tmp_path, photos_dir):
    listed = list_images(photos_dir)
    bare = pa.table({"uri": list(reversed(listed.column("uri").to_pylist()))})
    pq.write_table(bare, tmp_path / "m.parquet")
    again = list_images(tmp_path / "m.parquet")
    assert again.column("uri").to_pylist() == listed.column("uri").to_pylist()
    assert again.column("bytes").to_pylist() == listed.column("bytes").to_pylist()
    assert again.column("label").null_count == again.num_rows


def test_manifest_round_trip_keeps_labels(tmp_path, photos_dir):
    listed = list_images(photos_dir)
    write_manifest(listed, tmp_path / "m.parquet")
    assert list_images(tmp_path / "m.parquet").equals(listed)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "a.txt").write_text("x") and p / "a.txt", "not a .parquet manifest"),
        (lambda p: pq.write_table(pa.table({"path": ["a"]}), p / "m.parquet") or p / "m.parquet", "no 'uri' column"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        list_images(make(tmp_path))


@pytest.mark.parametrize("shard_size", [1, 3, 4, 9, 100])
def test_shards_cover_every_row_exactly_once(photos_dir, shard_size):
    table = list_images(photos_dir)
    shards = make_shards(table, shard_size)
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert covered == list(range(table.num_rows))
    assert all(1 <= s.size <= shard_size for s in shards)
    assert [s.index for s in shards] == list(range(len(shards)))


def test_shard_ids_are_deterministic_and_change_with_content(tmp_path, photos_dir):
    first = [s.shard_id for s in make_shards(list_images(photos_dir), 4)]
    assert first == [s.shard_id for s in make_shards(list_images(photos_dir), 4)]
    victim = sorted(photos_dir.rglob("*.JPEG"))[0]
    shutil.copy(victim, tmp_path / "keep")
    victim.write_bytes(victim.read_bytes() + b"\0")
    changed = [s.shard_id for s in make_shards(list_images(photos_dir), 4)]
    assert changed[0] != first[0] and changed[1:] == first[1:]


def test_shard_size_below_one_is_refused(photos_dir):
    with pytest.raises(ValueError, match="shard_size 0"):
        make_shards(list_images(photos_dir), 0)


@pytest.mark.parametrize("case", ["null and empty", "http"])
def test_a_null_or_empty_uri_and_an_http_uri_are_error_rows_and_nothing_is_fetched(tmp_path, http_server, case):
    photo = str(photo_paths(1)[0])
    uris = [photo, None, ""] if case == "null and empty" else [f"{http_server.url}/a.jpg", f"{http_server.url}/b.jpg"]
    pq.write_table(pa.table({"uri": pa.array(uris, pa.string())}), tmp_path / "m.parquet")
    listed = list_images(tmp_path / "m.parquet").column("uri").to_pylist()
    with ThreadPoolExecutor(2) as pool:
        blobs = dict(zip(listed, load_blobs(listed, pool)))
    assert "None" not in blobs
    failures = {u: (b.kind.value, b.message) for u, b in blobs.items() if isinstance(b, Failure)}
    if case == "null and empty":
        assert isinstance(blobs[photo], Blob) and failures == {
            "~manifest row 1: null uri": ("invalid_uri", "the manifest's uri in row 1 (0-based) is null"),
            "~manifest row 2: empty uri": ("invalid_uri", "the manifest's uri in row 2 (0-based) is empty")}
    else:
        assert failures == {u: ("unsupported", "uri scheme 'http' is not read; allowed: local paths and s3://")
                            for u in uris}
    assert http_server.requests == []


def test_a_folder_listing_picks_up_every_suffix_pillow_opens_and_each_such_file_ends_as_a_blob_or_a_row(tmp_path):
    registered = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    assert {".gif", ".ico", ".tga", ".ppm", ".jpg", ".png"} <= image_suffixes() <= registered | {".mpo"}
    assert not {".pdf", ".mpg", ".h5", ".grib"} & image_suffixes()  # save-only, identify-only, stubs: no pixels
    picture = Image.new("RGB", (40, 30), (200, 30, 30))
    for name in ("a.gif", "b.ICO", "c.tga", "d.ppm"):
        picture.save(tmp_path / name)
    for name in ("e.pdf", "f.mpg", "g.h5"):
        _touch(tmp_path / name)
    table = list_images(tmp_path)
    uris = table.column("uri").to_pylist()
    assert [os.path.basename(u) for u in uris] == ["a.gif", "b.ICO", "c.tga", "d.ppm"]
    assert skipped_counts(table) == {".h5": 1, ".mpg": 1, ".pdf": 1}
    with ThreadPoolExecutor(2) as pool:
        blobs = dict(zip((os.path.basename(u) for u in uris), load_blobs(uris, pool)))
    assert blobs["a.gif"].pillow_reason.startswith("GIF") and isinstance(blobs["d.ppm"], Blob)
    assert {n: (b.kind.value, b.message.split(";")[0]) for n, b in blobs.items() if isinstance(b, Failure)} == {
        "b.ICO": ("unsupported", "format ICO is not decoded"), "c.tga": ("unsupported", "format TGA is not decoded")}


def test_a_manifest_keeps_a_duplicated_uri_once_counts_the_rest_and_names_them(tmp_path, caplog):
    a, b = str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "b.jpg")
    uris = [a, b, a, a, b, f"file://{a}"]
    pq.write_table(pa.table({"uri": uris, "label": ["x", "y", "z", "z", "y", "w"]}), tmp_path / "m.parquet")
    table = list_images(tmp_path / "m.parquet")
    assert table.column("uri").to_pylist() == [a, b] and table.column("label").to_pylist() == ["x", "y"]  # first rows
    assert skipped_counts(table) == {"duplicate uri": 4}
    assert describe_skipped(skipped_counts(table)) == "skipped 4 files: duplicate uri 4"
    assert f"lists 2 uri(s) more than once: {a!r} (4 times), {b!r} (2 times)" in caplog.text


def test_manifest_paths_resolve_against_its_folder_and_file_uris_are_plain_paths(tmp_path, monkeypatch):
    for rel in ("photos/cat/a.jpg", "photos/b c.jpg", "lists/c.jpg"):
        _touch(tmp_path / rel)
    uris = ["../photos/cat/a.jpg", f"file://{tmp_path}/photos/b%20c.jpg", "c.jpg", f"file://localhost{tmp_path}/lists/c.jpg"]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "lists" / "m.parquet")
    monkeypatch.chdir(tmp_path / "photos" / "cat")  # the current folder plays no part
    table = list_images(tmp_path / "lists" / "m.parquet")
    assert table.column("uri").to_pylist() == [f"{tmp_path}/lists/c.jpg", f"{tmp_path}/photos/b c.jpg",
                                                f"{tmp_path}/photos/cat/a.jpg"]
    assert table.column("bytes").to_pylist() == [1, 1, 1] and NOT_FOUND not in table.column("mtime_ns").to_pylist()
    assert skipped_counts(table) == {"duplicate uri": 1}  # c.jpg, given as a relative path and as a file:// uri


def test_a_manifest_uri_with_no_file_is_marked_not_found_and_named_in_the_log(tmp_path, caplog):
    _touch(tmp_path / "a.jpg")
    pq.write_table(pa.table({"uri": [str(tmp_path / "a.jpg"), "/no/such/never.jpg"]}), tmp_path / "m.parquet")
    table = list_images(tmp_path / "m.parquet")
    assert dict(zip(table.column("uri").to_pylist(), table.column("mtime_ns").to_pylist()))["/no/such/never.jpg"] == NOT_FOUND
    assert "names 1 uri(s) with no file or object behind them: '/no/such/never.jpg'" in caplog.text
