"""Artifact store against a local directory and a real S3-compatible server.

Every test here runs twice through the `storage` fixture: `file://` and `s3://` (moto on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lmaas.errors import AlreadyExistsError, IntegrityError, NotFoundError, UnreachableError
from lmaas.storage import MANIFEST, Manifest, Storage


def make_tree(root: Path, files: int = 3, size: int = 1000) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        sub = root / ("nested" if i % 2 else "") / f"f{i}.bin"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(bytes([i % 251]) * (size + i))
    return root


def test_write_read_roundtrip_returns_sha256(storage: Storage):
    data = b"hello lmaas\n" * 100
    digest = storage.write_bytes("a/b/c.txt", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert storage.read_bytes("a/b/c.txt") == data
    assert storage.sha256("a/b/c.txt") == digest
    assert storage.size("a/b/c.txt") == len(data)
    assert storage.exists("a/b/c.txt")
    assert storage.list("a") == ["a/b/c.txt"]
    with storage.open("a/b/c.txt") as f:
        assert f.read(5) == b"hello"


def test_missing_objects_raise_not_found(storage: Storage):
    with pytest.raises(NotFoundError, match="no object"):
        storage.read_bytes("missing.txt")
    with pytest.raises(NotFoundError):
        storage.size("missing.txt")
    assert storage.list("nothing-here") == []
    assert not storage.exists("missing.txt")


def test_immutable_write_refuses_overwrite(storage: Storage):
    storage.write_text("x.json", "{}", overwrite=False)
    with pytest.raises(AlreadyExistsError, match="immutable"):
        storage.write_text("x.json", "{\"a\": 1}", overwrite=False)
    assert storage.read_text("x.json") == "{}"
    storage.write_text("x.json", "[]")  # overwrite=True is the default for mutable objects
    assert storage.read_text("x.json") == "[]"


def test_failed_stream_write_leaves_nothing(storage: Storage):
    with pytest.raises(RuntimeError):
        with storage.writer("partial.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("writer crashed")
    assert not storage.exists("partial.bin")
    assert storage.list() == []


def test_put_and_get_file(storage: Storage, tmp_path: Path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01" * 5000)
    digest = storage.put_file(src, "files/src.bin")
    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "copy.bin"
    storage.get_file("files/src.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(NotFoundError):
        storage.get_file("files/nope.bin", tmp_path / "nope.bin")
    assert not (tmp_path / "nope.bin").exists()


def test_delete_object_and_prefix(storage: Storage):
    storage.write_text("d/one", "1")
    storage.write_text("d/sub/two", "2")
    storage.write_text("keep", "3")
    storage.delete("d/one")
    assert storage.list() == ["d/sub/two", "keep"]
    storage.delete("d")
    assert storage.list() == ["keep"]
    storage.delete("does/not/exist")
    with pytest.raises(ValueError, match="whole artifact store"):
        storage.delete("")


def test_paths_cannot_escape_the_root(storage: Storage):
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.write_text("../outside", "x")


def test_publish_dir_is_verified_and_immutable(storage: Storage, tmp_path: Path):
    src = make_tree(tmp_path / "model")
    manifest = storage.publish_dir(src, "models/m/1")
    assert [f.path for f in manifest.files] == ["f0.bin", "f2.bin", "nested/f1.bin"]
    assert manifest.size == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    assert manifest.sha256 == Manifest.of_dir(src).sha256  # content hash, independent of time
    assert storage.read_manifest("models/m/1") == manifest
    assert storage.list_published("models") == ["models/m/1"]
    assert storage.verify("models/m/1") == manifest
    with pytest.raises(AlreadyExistsError, match="immutable"):
        storage.publish_dir(src, "models/m/1")

    out = tmp_path / "download"
    storage.download_dir("models/m/1", out)
    for entry in manifest.files:
        assert (out / entry.path).read_bytes() == (src / entry.path).read_bytes()
    assert json.loads((out / MANIFEST).read_text())["sha256"] == manifest.sha256


@pytest.mark.parametrize("bad_path", ["/etc/cron.d/evil", "../../outside", "a/../../outside", "a//b", "a\\b", "."])
def test_a_stored_manifest_with_an_unsafe_path_is_refused_and_nothing_lands_outside(tmp_path: Path, bad_path: str):
    """A manifest comes from storage, so it is untrusted: an entry that would write outside the download folder is refused."""
    storage = Storage(f"file://{tmp_path / 'store'}")
    storage.publish_dir(make_tree(tmp_path / "m"), "m/1")
    entry = {"path": bad_path, "sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}
    forged = json.loads(storage.read_text(f"m/1/{MANIFEST}"))
    storage.write_text(f"m/1/{MANIFEST}", json.dumps({**forged, "files": forged["files"] + [entry]}))
    for read in (lambda: storage.read_manifest("m/1"), lambda: storage.verify("m/1"), lambda: storage.download_dir("m/1", tmp_path / "dl" / "x")):
        with pytest.raises(IntegrityError, match="unsafe or repeated path"):
            read()
    assert not (tmp_path / "outside").exists() and not (tmp_path / "dl").exists()
    twice = {**forged, "files": forged["files"] + forged["files"][:1]}
    with pytest.raises(IntegrityError, match="repeated"):
        Manifest.from_json(json.dumps(twice))
    with pytest.raises(IntegrityError, match="malformed entry"):
        Manifest.from_json(json.dumps({**forged, "files": [{"path": "w", "sha256": "zz", "size": 1}]}))
    with pytest.raises(IntegrityError, match="not a valid manifest"):
        Manifest.from_json(b"{not json")


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_verify_refuses_damaged_files(storage: Storage, tmp_path: Path, damage: str):
    storage.publish_dir(make_tree(tmp_path / "m"), "m/1")
    target = "m/1/nested/f1.bin"
    original = storage.read_bytes(target)
    if damage == "altered":
        storage.write_bytes(target, bytes([original[0] ^ 0xFF]) + original[1:])
    elif damage == "truncated":
        storage.write_bytes(target, original[:-10])
    else:
        storage.delete(target)
    with pytest.raises(IntegrityError, match="nested/f1.bin") as info:
        storage.verify("m/1")
    assert damage in info.value.message
    if damage == "altered":
        with pytest.raises(IntegrityError):
            storage.download_dir("m/1", tmp_path / "dl")
        assert not (tmp_path / "dl" / "nested" / "f1.bin").exists()


def test_concurrent_publishers_one_wins(storage: Storage, tmp_path: Path):
    trees = [make_tree(tmp_path / f"t{i}", files=2, size=100 + i) for i in range(4)]
    outcomes: list[str] = []

    def publish(tree: Path) -> None:
        try:
            storage.publish_dir(tree, "race/1")
            outcomes.append("won")
        except AlreadyExistsError:
            outcomes.append("lost")

    threads = [threading.Thread(target=publish, args=(t,)) for t in trees]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # exactly one winner (rename locally, a conditional PUT of the claim on S3), and what is
    # published is that writer's tree, intact
    assert sorted(outcomes) == ["lost", "lost", "lost", "won"]
    manifest = storage.verify("race/1")
    assert manifest.sha256 in {Manifest.of_dir(t).sha256 for t in trees}


KILLED_PUBLISHER = """
import sys, time
from lmaas.storage import Storage

uri, endpoint, src, prefix, mode = sys.argv[1:]
storage = Storage(uri, endpoint_url=endpoint or None)

def stall(path, nbytes):
    print("stored", path, flush=True)
    time.sleep(600)

if mode == "dir":
    storage.publish_dir(src, prefix, progress=stall)
else:
    with storage.writer(prefix) as f:
        f.write(b"half of an object")
        stall(prefix, 0)
"""


@pytest.mark.parametrize("mode", ["dir", "object"])
def test_writer_killed_mid_publish_leaves_nothing_visible(storage: Storage, storage_uri, tmp_path: Path, mode: str):
    uri, endpoint = storage_uri
    src = make_tree(tmp_path / "big", files=5)
    target = "models/victim/1" if mode == "dir" else "models/victim.bin"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, uri, endpoint or "", str(src), target, mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # the writer has stored something and is stalled mid-publish
        assert line.startswith("stored"), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    if mode == "dir":
        assert storage.read_manifest(target) is None
        assert storage.list_published("models") == []
        with pytest.raises(NotFoundError):
            storage.verify(target)
        # what the dead writer left is garbage, and collecting it lets a new writer publish
        garbage = storage.garbage("models", depth=2)
        assert garbage, "the killed writer's leftovers should be found"
        for path in garbage:
            storage.delete(path)
        assert storage.garbage("models", depth=2) == []
        storage.publish_dir(src, target)
        assert storage.list_published("models") == [target]
    else:
        assert not storage.exists(target)
        assert storage.list("models") == []


def test_garbage_never_includes_published_or_plain_objects(storage: Storage, tmp_path: Path):
    storage.publish_dir(make_tree(tmp_path / "a"), "col/1")
    storage.write_text("col/index.json", "{}")
    assert storage.garbage("col") == []
    assert storage.garbage("nothing") == []


def test_pyarrow_filesystem_reads_what_storage_wrote(storage: Storage):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"x": [1, 2, 3]})
    fs, root = storage.pyarrow_filesystem()
    if storage.is_local:
        fs.create_dir(f"{root}/t", recursive=True)
    pq.write_table(table, f"{root}/t/part-0.parquet", filesystem=fs)
    assert storage.list("t") == ["t/part-0.parquet"]
    assert pq.read_table(f"{root}/t/part-0.parquet", filesystem=fs).equals(table)


def test_check_passes_for_reachable_store(storage: Storage):
    storage.check()


def test_check_reports_missing_bucket_and_unreachable_endpoint(s3_server):
    with pytest.raises(UnreachableError, match="bucket 'no-such-bucket' does not exist"):
        Storage("s3://no-such-bucket/x", endpoint_url=s3_server.endpoint, max_attempts=1).check()
    with pytest.raises(UnreachableError, match="unreachable"):
        Storage("s3://b/x", endpoint_url="http://127.0.0.1:9", connect_timeout=1, max_attempts=1).check()
