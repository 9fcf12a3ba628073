"""A local write that meets a full device says so in one line (the file, its size, the space free there) and leaves
no temporary file behind; tested on a real 64 KiB tmpfs (root only: skipped where mount is not permitted)."""


import fsspec
import pytest

from a2k.quiet import said_in_one_line
from tasks.storage import NoSpaceLeft, create_exclusive, write_atomic


@pytest.mark.parametrize("write", [write_atomic, create_exclusive])
def test_a_write_to_a_full_device_names_the_file_and_the_space_and_leaves_no_temporary(tiny_disk, write):
    fs = fsspec.filesystem("file")
    target = f"{tiny_disk}/out/part-0.parquet"
    with pytest.raises(NoSpaceLeft) as raised:
        write(fs, target, b"x" * 200_000)
    message = str(raised.value)
    assert "\n" not in message and said_in_one_line(raised.value) and raised.value.errno == 28
    assert f"no space left on the device of '{tiny_disk}/out' writing 'part-0.parquet' (195.3 KiB;" in message
    assert "free at least 195.3 KiB there" in message
    assert sorted(p.name for p in (tiny_disk / "out").iterdir()) == []  # the half-written temporary is gone
    write(fs, target, b"x" * 1000)  # the space is back: the same write of a smaller file goes through
    assert (tiny_disk / "out" / "part-0.parquet").stat().st_size == 1000
