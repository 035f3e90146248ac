"""The hand-built tar headers are the ones tarfile writes, and the tar reads back."""

import hashlib
import io
import tarfile

import pytest

from pipeline.sharding.tarfmt import TarWriter, member_header


@pytest.mark.parametrize(
    "name,size",
    [
        ("n01440764_10026.jpg", 1555),
        ("a.cls", 1),
        ("x" * 100, 5),
        ("y" * 101 + ".json", 7),
        ("é.jpg", 3),
        ("big.jpg", 8**11),
    ],
)
def test_member_header_matches_tarfile(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert member_header(name, size) == info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def test_writer_offsets_point_at_the_data():
    buf = io.BytesIO()
    tw = TarWriter(buf)
    tw.add_sample("k1", [("cls", b"7"), ("jpg", b"\xff" * 700)])
    tw.add_sample("k2", [("cls", b"12"), ("jpg", b"\x01" * 512)])
    tw.close()
    data = buf.getvalue()
    assert len(data) % 10240 == 0 and tw.pos == len(data)
    lines = tw.index().decode().splitlines()
    assert lines[0] == "v1.2 2"
    for line in lines[1:]:
        f = line.split()
        for _ext, off, size, name in zip(f[0::4], f[1::4], f[2::4], f[3::4]):
            member = tarfile.open(fileobj=io.BytesIO(data)).getmember(name)
            assert (int(off), int(size)) == (member.offset_data, member.size)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("k2.cls").read() == b"12"


@pytest.mark.parametrize("file", ["n01/n01_1.JPEG", 'we"ird\\ näme.jpg'])
def test_sample_json_is_json_dumps(file):
    import json

    from pipeline.sharding.writer import sample_json

    meta = {"file": file, "wnid": "n01", "class": 3, "width": 10, "height": 20}
    assert sample_json(file, "n01", 3, 10, 20) == json.dumps(meta).encode()


@pytest.mark.parametrize("key", ["n01440764_10026", "k" * 94, "k" * 95])
def test_add_image_matches_add_sample(key):  # keys of 95 and 96 characters: the last fast one, the first GNU one
    parts = [("cls", b"12"), ("jpg", b"\xff\xd8" + b"\x07" * 1000), ("json", b'{"a": 1}')]
    a, b = io.BytesIO(), io.BytesIO()
    ta, tb = TarWriter(a, chunk=1024), TarWriter(b)  # a small chunk: flushes mid-shard too
    for i in range(3):
        ta.add_sample(f"{key}{i}", parts)
        tb.add_image(f"{key}{i}", *(d for _, d in parts))
    ta.close()
    tb.close()
    assert a.getvalue() == b.getvalue() and ta.index() == tb.index()
    assert ta.sha.hexdigest() == tb.sha.hexdigest() == hashlib.sha256(a.getvalue()).hexdigest()


class _FailingFile(io.BytesIO):
    def write(self, b):
        raise OSError(28, "No space left on device")


def test_a_write_error_of_the_writer_thread_reaches_the_caller():
    tw = TarWriter(_FailingFile(), chunk=1024)
    with pytest.raises(OSError, match="No space left"):
        for i in range(50):  # many flushes: the error surfaces at one of them, or at close
            tw.add_sample(f"k{i}", [("jpg", b"\x01" * 2000)])
        tw.close()
    assert not tw._thread.is_alive()


def test_an_error_in_the_caller_stops_the_writer_thread():
    with pytest.raises(RuntimeError, match="bad image"):
        with TarWriter(io.BytesIO(), chunk=1024) as tw:
            tw.add_sample("k", [("jpg", b"\x01" * 2000)])
            raise RuntimeError("bad image")
    assert not tw._thread.is_alive()
