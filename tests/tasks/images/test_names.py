import os

import pytest

from tasks.images.names import path_of_uri, uri_of_path


@pytest.mark.parametrize("name, uri", [
    (b"plain.jpg", "plain.jpg"),
    ("caf\u00e9.jpg".encode(), "caf\u00e9.jpg"),  # valid UTF-8 is kept as it is
    (b"caf\xe9-\xff.jpg", "caf\\xe9-\\xff.jpg"),
    (b"lit\\xe9.jpg", "lit\\\\xe9.jpg"),  # a literal backslash + "xe9" is not the byte 0xe9
    (b"mix\xc3\xa9\xe9\\.jpg", "mix\u00e9\\xe9\\\\.jpg"),
])
def test_a_name_round_trips_to_its_own_bytes_through_a_utf8_uri(name, uri):
    path = os.fsdecode(b"/data/" + name)
    assert uri_of_path(path) == "/data/" + uri
    uri.encode("utf-8")  # a Parquet string
    assert os.fsencode(path_of_uri(uri_of_path(path))) == b"/data/" + name
