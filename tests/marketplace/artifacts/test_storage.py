"""The storage interface, the same tests against both backends (the filesystem, and S3 on moto's server)."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc

import pytest

from marketplace.artifacts.storage import FileSystemStorage, S3ObjectStorage, get_storage
from marketplace.core.exceptions import TooLarge, ValidationFailed

MiB = 1024 * 1024
BLOB = bytes(range(256)) * 4096 * 3 + b"tail"  # 3 MiB and a little: several chunks, not a round number
SHA = hashlib.sha256(BLOB).hexdigest()


def chunks_of(data: bytes, size: int = MiB):
    return (data[start:start + size] for start in range(0, len(data), size))


def test_the_settings_choose_the_backend(backend):
    expected = {"filesystem": FileSystemStorage, "s3": S3ObjectStorage}[backend.name]

    assert isinstance(get_storage(), expected)


def test_a_saved_blob_is_stored_under_its_sha256_and_reads_back_whole(backend):
    storage = backend.storage

    assert storage.save(chunks_of(BLOB), max_bytes=len(BLOB)) == (SHA, len(BLOB))

    assert storage.exists(SHA) and storage.size(SHA) == len(BLOB)
    assert not storage.exists(hashlib.sha256(b"other").hexdigest())
    with storage.open(SHA) as stream:
        assert stream.read() == BLOB
    with storage.local_path(SHA) as path:
        assert path.read_bytes() == BLOB
    assert backend.stored() == [f"{SHA[:2]}/{SHA[2:4]}/{SHA}" if backend.name == "filesystem"
                                else f"idlegrid/artifacts/{SHA[:2]}/{SHA[2:4]}/{SHA}"]
    assert backend.leftovers() == []


def test_open_streams_in_the_chunks_asked_for(backend):
    backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB))

    with backend.storage.open(SHA) as stream:
        parts = list(iter(lambda: stream.read(MiB), b""))

    assert [len(part) for part in parts] == [MiB, MiB, MiB, 4]
    assert b"".join(parts) == BLOB


def test_it_refuses_a_blob_past_the_limit_and_leaves_nothing_behind(backend):
    with pytest.raises(TooLarge):
        backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB) - 1)

    assert backend.stored() == []
    assert backend.leftovers() == []
    assert not backend.storage.exists(SHA)


def test_it_refuses_a_blob_that_does_not_hash_to_the_declared_sha256_and_leaves_nothing_behind(backend):
    declared = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(ValidationFailed, match=f"hashes to {SHA}, not the declared {declared}"):
        backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB), declared_sha256=declared)

    assert backend.stored() == []
    assert backend.leftovers() == []


def test_it_accepts_a_matching_declared_sha256(backend):
    assert backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB), declared_sha256=SHA) == (SHA, len(BLOB))


def test_saving_the_same_bytes_twice_stores_one_blob(backend):
    first = backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB))
    second = backend.storage.save(chunks_of(BLOB, 1000), max_bytes=len(BLOB))

    assert first == second == (SHA, len(BLOB))
    assert len(backend.stored()) == 1
    assert backend.leftovers() == []


def test_a_blob_that_is_not_stored_is_not_found_by_any_reader(backend):
    missing = hashlib.sha256(b"never stored").hexdigest()

    assert not backend.storage.exists(missing)
    for read in (backend.storage.open, backend.storage.size):
        with pytest.raises(FileNotFoundError):
            read(missing)
    with pytest.raises(FileNotFoundError), backend.storage.local_path(missing):
        pass
    assert backend.leftovers() == []


def test_concurrent_saves_of_the_same_bytes_agree(backend):
    results, errors = [], []

    def save():
        try:
            results.append(get_storage().save(chunks_of(BLOB), max_bytes=len(BLOB)))
        except Exception as exc:  # reported below, with the thread's own error
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [(SHA, len(BLOB))] * 4
    assert len(backend.stored()) == 1


# --- what only one backend does ----------------------------------------------------------------------

def test_the_filesystem_backend_keeps_todays_layout_and_hands_out_the_file_itself(artifact_dir):
    storage = get_storage()
    storage.save([BLOB], max_bytes=len(BLOB))

    with storage.local_path(SHA) as path:
        assert path == artifact_dir / SHA[:2] / SHA[2:4] / SHA
    assert path.read_bytes() == BLOB  # the stored file itself: it stays


def test_local_path_on_s3_is_a_temporary_copy_removed_on_exit(s3, settings):
    storage = get_storage()
    storage.save([BLOB], max_bytes=len(BLOB))

    with storage.local_path(SHA) as path:
        assert path.parent == settings.IDLEGRID_STORAGE_TMP_DIR and path.read_bytes() == BLOB
    assert not path.exists()
    with pytest.raises(RuntimeError), storage.local_path(SHA) as failing:
        raise RuntimeError("a reader that fails")
    assert not failing.exists()
    assert list(settings.IDLEGRID_STORAGE_TMP_DIR.iterdir()) == []


def test_s3_does_not_upload_an_object_that_exists_already(s3):
    storage = get_storage()
    storage.save([BLOB], max_bytes=len(BLOB))
    key = s3.key_of(SHA)
    s3.client.put_object(Bucket=s3.name, Key=key, Body=b"marker: the second save must leave this alone")

    assert storage.save([BLOB], max_bytes=len(BLOB)) == (SHA, len(BLOB))

    assert s3.client.get_object(Bucket=s3.name, Key=key)["Body"].read().startswith(b"marker")


def test_s3_objects_are_binary_under_the_content_addressed_key(s3):
    get_storage().save([BLOB], max_bytes=len(BLOB))

    head = s3.client.head_object(Bucket=s3.name, Key=s3.key_of(SHA))

    assert (head["ContentLength"], head["ContentType"]) == (len(BLOB), "application/octet-stream")


def test_s3_moves_a_large_blob_in_bounded_memory(s3):
    """64 MiB through save (a multipart upload) and local_path with less than half of it traced at the
    peak. Measured here: about 13-20 MiB whatever the size; S3Storage.save (upload_fileobj) took 68 MiB."""
    size = 64 * MiB
    chunk = bytes(range(256)) * 4096  # 1 MiB, handed out again and again: the input costs no memory
    storage = get_storage()

    tracemalloc.start()
    try:
        sha, stored = storage.save((chunk for _ in range(size // MiB)), max_bytes=size)
        with storage.local_path(sha) as path:
            assert path.stat().st_size == size
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert (sha, stored) == (hashlib.sha256(chunk * (size // MiB)).hexdigest(), size)
    assert peak < size / 2, f"{peak / MiB:.1f} MiB traced at the peak"


def test_delete_removes_the_blob_and_deleting_again_is_no_error(backend):
    backend.storage.save(chunks_of(BLOB), max_bytes=len(BLOB))
    other, _ = backend.storage.save([b"other"], max_bytes=100)

    backend.storage.delete(SHA)
    backend.storage.delete(SHA)

    assert not backend.storage.exists(SHA) and backend.storage.exists(other)
    with pytest.raises(FileNotFoundError):
        backend.storage.open(SHA)
    assert len(backend.stored()) == 1


def test_purging_staging_files_removes_only_those_untouched_for_long(backend):
    import os
    import time

    backend.tmp_dir.mkdir(parents=True, exist_ok=True)
    dead, alive = backend.tmp_dir / "tmpdead", backend.tmp_dir / "tmpalive"
    dead.write_bytes(b"half an upload"), alive.write_bytes(b"an upload in progress")
    two_hours_ago = time.time() - 7200
    os.utime(dead, (two_hours_ago, two_hours_ago))

    assert backend.storage.temp_files_purge(older_than=3600) == 1

    assert backend.leftovers() == [alive]
