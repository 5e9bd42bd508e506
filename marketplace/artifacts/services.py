from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from marketplace.artifacts.models import Artifact, TensorHeader
from marketplace.artifacts.selectors import artifacts_quota_used
from marketplace.artifacts.storage import ArtifactStorage, get_storage
from marketplace.core.exceptions import Conflict, QuotaExceeded, ValidationFailed
from marketplace.core.tensors import TensorSummary, summarize_file, summary_storable
from marketplace.workers.models import Device
from worker_agent.protocol import is_sha256_hex


def artifact_store(
    *,
    chunks: Iterable[bytes],
    uploaded_by: AbstractBaseUser | None = None,
    device: Device | None = None,
    declared_sha256: str | None = None,
    max_bytes: int | None = None,
    quota_of: AbstractBaseUser | None = None,
) -> tuple[Artifact, bool]:
    """Store a blob by content; returns (artifact, created). Uploading the same bytes twice is a no-op.

    With `quota_of`, the upload counts against that person's IDLEGRID_ARTIFACT_QUOTA_BYTES: it is refused
    (QuotaExceeded, 413) as soon as the bytes received pass what is left, and nothing is stored. Only
    people's uploads through the API pass it: what the marketplace stores itself (splits, merges, rounds)
    and devices' outputs (bounded per upload by IDLEGRID_MAX_ARTIFACT_BYTES) are never refused for it."""
    if declared_sha256 is not None and not is_sha256_hex(declared_sha256):
        raise ValidationFailed("X-Content-SHA256 must be 64 lowercase hex digits")
    if quota_of is not None and not _owns(quota_of, declared_sha256):
        chunks = _within_quota(chunks, used=artifacts_quota_used(owner=quota_of),
                               quota=settings.IDLEGRID_ARTIFACT_QUOTA_BYTES)
    storage = get_storage()
    sha256, size = storage.save(
        chunks, max_bytes=max_bytes or settings.IDLEGRID_MAX_ARTIFACT_BYTES, declared_sha256=declared_sha256
    )
    with transaction.atomic():
        # The row lock orders this store after a collection removing the same blob (artifact_remove):
        # then the row is made anew, and the bytes the collection deleted after this save are missed.
        artifact, created = Artifact.objects.select_for_update().get_or_create(
            sha256=sha256, defaults={"size": size, "uploaded_by": uploaded_by, "uploaded_by_device": device}
        )
        if created and not storage.exists(sha256):
            raise Conflict("the artifact was collected while it was uploaded: upload it again")
        if not created:
            Artifact.objects.filter(pk=sha256).update(stored_at=timezone.now())
        if uploaded_by is not None:
            artifact.owners.add(uploaded_by)
        if device is not None:
            artifact.devices.add(device)  # it holds these bytes: it may report them (workunits/results.py)
    if device is not None and (created or not TensorHeader.objects.filter(pk=sha256).exists()):
        # A device uploads outputs: what its report checks is read now, once, not at every report of them.
        tensor_summary_of(sha256)
    return artifact, created


def artifacts_store_many(*, blobs: Sequence[bytes]) -> list[str]:
    """Store many small blobs the marketplace makes itself (a split's unit inputs: held by no person or
    device, under no quota), in one transaction of a few statements instead of one per blob. Returns their
    sha256s in order. Like artifact_store: bytes first, then the rows, row-locked, so that a collection
    removing one of them either comes first (its row is then made anew and its bytes written again) or
    finds it stored again now (stored_at), and spares it."""
    storage = get_storage()
    saved = [storage.save([data], max_bytes=settings.IDLEGRID_MAX_ARTIFACT_BYTES) for data in blobs]
    sizes = dict(saved)
    with transaction.atomic():
        existing = set(Artifact.objects.select_for_update().filter(pk__in=list(sizes)).values_list("pk", flat=True))
        Artifact.objects.filter(pk__in=list(existing)).update(stored_at=timezone.now())
        new = [sha for sha in sizes if sha not in existing]
        Artifact.objects.bulk_create([Artifact(sha256=sha, size=sizes[sha]) for sha in new], ignore_conflicts=True)
        by_sha = dict(zip((sha for sha, _ in saved), blobs))
        for sha in new:
            if not storage.exists(sha):  # collected between its save and its row: write the bytes again
                storage.save([by_sha[sha]], max_bytes=settings.IDLEGRID_MAX_ARTIFACT_BYTES)
    return [sha for sha, _ in saved]


def tensor_summary_of(sha256: str) -> TensorSummary:
    """The stored blob's tensor summary, read from its bytes, and kept when it is small enough (TensorHeader):
    for bytes that arrived before summaries were taken, or that a person uploaded and a device then too."""
    with get_storage().local_path(sha256) as path:
        summary = summarize_file(path)
    tensor_headers_record({sha256: summary})
    return summary


def tensor_headers_record(summaries: dict[str, TensorSummary]) -> None:
    """Keep these summaries (the storable ones). Content-addressed: a row already there holds the same summary,
    and an artifact collected meanwhile simply gets none (the FK refuses it: nothing to summarize any more)."""
    rows = [TensorHeader(artifact_id=sha, summary=summary.to_json())
            for sha, summary in summaries.items() if summary_storable(summary)]
    if not rows:
        return
    try:
        with transaction.atomic():
            TensorHeader.objects.bulk_create(rows, ignore_conflicts=True)
    except IntegrityError:
        pass


def artifacts_store_inline(*, device: Device, blobs: dict[str, tuple[bytes, TensorSummary]]) -> None:
    """Store small outputs that arrived inside a batched report, as an upload of each by the device would:
    content-addressed (bytes already stored are not written again), the device recorded as holding them,
    their tensor summaries kept. The caller checked each blob's sha256 and size. Set-based: five statements
    for the whole batch, whatever its size.

    The bytes are written first, outside the transaction (each save is an fsync). The rows are then locked or
    made: a collection (artifact_remove) that deleted a row and its bytes between the write and the lock is
    seen as a row made anew here, and those bytes are written again while the new row is held."""
    if not blobs:
        return
    storage = get_storage()
    _save_all(storage, {sha: data for sha, (data, _) in blobs.items()})
    shas = sorted(blobs)  # one lock order for every batch
    now = timezone.now()
    with transaction.atomic():
        existing = set(Artifact.objects.select_for_update().filter(pk__in=shas).order_by("pk").values_list("pk", flat=True))
        made = [sha for sha in shas if sha not in existing]
        Artifact.objects.bulk_create([Artifact(sha256=sha, size=len(blobs[sha][0]), uploaded_by_device=device,
                                               stored_at=now) for sha in made], ignore_conflicts=True)
        if existing:
            Artifact.objects.filter(pk__in=existing).update(stored_at=now)
        Artifact.devices.through.objects.bulk_create(
            [Artifact.devices.through(artifact_id=sha, device_id=device.pk) for sha in shas], ignore_conflicts=True)
        TensorHeader.objects.bulk_create([TensorHeader(artifact_id=sha, summary=blobs[sha][1].to_json())
                                          for sha in shas if summary_storable(blobs[sha][1])], ignore_conflicts=True)
        for sha in made:
            if not storage.exists(sha):
                storage.save([blobs[sha][0]], max_bytes=len(blobs[sha][0]), declared_sha256=sha)


_SAVERS: ThreadPoolExecutor | None = None
_SAVERS_LOCK = threading.Lock()
# Each save ends in an fsync (or an S3 PUT): 1-4 ms each on this machine's disk, one after another 50 of
# them were most of a batched report's time; eight in flight take about a third as long (bench/report_cost.py).
INLINE_SAVE_THREADS = 8


def _save_all(storage: ArtifactStorage, blobs: dict[str, bytes]) -> None:
    """Write the blobs not stored yet, several at once (an fsync waits on the disk, not on the GIL)."""
    todo = [(sha, data) for sha, data in blobs.items() if not storage.exists(sha)]
    if len(todo) <= 1:
        for sha, data in todo:
            storage.save([data], max_bytes=len(data), declared_sha256=sha)
        return
    global _SAVERS
    with _SAVERS_LOCK:
        if _SAVERS is None:  # made on first use, in the process that uses it (after a server's fork)
            _SAVERS = ThreadPoolExecutor(max_workers=INLINE_SAVE_THREADS, thread_name_prefix="inline-output")
    futures = [_SAVERS.submit(storage.save, [data], max_bytes=len(data), declared_sha256=sha) for sha, data in todo]
    wait(futures)
    for future in futures:
        future.result()  # the first failure is raised, once every write ended (none is left running)


def _owns(user: AbstractBaseUser, sha256: str | None) -> bool:
    """Bytes the person owns already add nothing to their usage (known only when the upload declares them)."""
    return sha256 is not None and Artifact.owners.through.objects.filter(artifact_id=sha256, user_id=user.pk).exists()


def _within_quota(chunks: Iterable[bytes], *, used: int, quota: int) -> Iterator[bytes]:
    received = 0
    for chunk in chunks:
        received += len(chunk)
        if used + received > quota:
            raise QuotaExceeded(
                f"this upload exceeds your storage quota: {used:,} of {quota:,} bytes are used by the artifacts "
                f"you hold and the upload passed {quota - used:,} bytes; delete some (DELETE /api/v1/artifacts/"
                f"<sha256>/) and upload again", fields={"used": used, "quota": quota})
        yield chunk


def artifact_disown(*, artifact: Artifact, owner: AbstractBaseUser) -> None:
    """The person no longer holds the artifact: it leaves their list and their quota."""
    artifact.owners.remove(owner)


def artifact_remove(*, sha256: str, needed: Callable[[Artifact], bool]) -> bool:
    """Delete the row and the bytes of an artifact no person holds and that `needed` (the caller's check
    of every reference, and of the devices that hold it) says nothing uses. The row is locked and checked again
    inside, so a concurrent upload of the same bytes either comes first (and keeps it) or makes it anew.
    True when it was removed. The references are checked before the DELETE: a PROTECTed foreign key
    never turns into an IntegrityError."""
    with transaction.atomic():
        artifact = Artifact.objects.select_for_update().filter(pk=sha256).first()
        if artifact is None or artifact.owners.exists() or needed(artifact):
            return False
        artifact.delete()
        # Inside the transaction and after the row's DELETE: if storage fails, the row comes back with its
        # bytes; a store waiting on the lock sees the row gone and checks the bytes (artifact_store).
        get_storage().delete(sha256)
    return True
