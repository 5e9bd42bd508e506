from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, parsers, serializers, status
from rest_framework.generics import GenericAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import DeviceAuthentication, IsPerson
from marketplace.api.filters import ArtifactFilter
from marketplace.api.schema import ErrorOut
from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import NotFound, ValidationFailed
from marketplace.jobs.artifacts import artifact_delete, artifacts_in_use
from marketplace.jobs.selectors import artifact_get_for_user, artifacts_for_owner
from marketplace.workers.models import Device
from marketplace.workunits.selectors import artifact_get_for_device
from worker_agent.protocol import is_sha256_hex

CHUNK = 1024 * 1024


class StreamParser(parsers.BaseParser):
    """Hands the view the request stream itself, so an upload is never read whole into memory."""

    media_type = "application/octet-stream"

    def parse(self, stream, media_type=None, parser_context=None):
        return stream


def _chunks(stream):
    if stream is None:
        return
    while chunk := stream.read(CHUNK):
        yield chunk


ArtifactOut = inline_serializer("Artifact", {
    "sha256": serializers.CharField(help_text="the artifact's name: name it in job specs and reports"),
    "size": serializers.IntegerField(help_text="bytes")})


class HeldArtifactOut(serializers.Serializer):
    sha256 = serializers.CharField(help_text="the artifact's name: the sha256 of its bytes")
    size = serializers.IntegerField(help_text="bytes")
    created_at = serializers.DateTimeField(help_text="when these bytes were first stored (by anyone)")
    in_use_by = serializers.ListField(
        child=serializers.IntegerField(),
        help_text="ids of your jobs that have not ended and use it (spec or unit inputs): it cannot be deleted "
                  "while this is not empty")


class ArtifactUploadApi(GenericAPIView):
    """GET lists the artifacts you hold (people only); POST uploads one (people and devices)."""

    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]
    parser_classes = [StreamParser]
    throttle_scope = "upload"
    throttle_exempt_methods = ("GET",)  # the upload budget is for uploads
    filterset_class = ArtifactFilter

    def get_queryset(self):
        return artifacts_for_owner(owner=self.request.user)

    def get_permissions(self):
        return [IsPerson()] if self.request.method == "GET" else super().get_permissions()


    @extend_schema(
        operation_id="artifact_list",
        responses={200: HeldArtifactOut(many=True), 400: ErrorOut, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut},
        description="The artifacts you hold (uploaded, or your jobs' outputs), newest first by when you came to "
                    "hold them, a page at a time (docs/api/lists.md).",
    )
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        uses = artifacts_in_use(owner=request.user, shas=[row.artifact_id for row in page])
        return self.get_paginated_response([
            {"sha256": row.artifact.sha256, "size": row.artifact.size, "created_at": row.artifact.created_at,
             "in_use_by": uses.get(row.artifact_id, [])} for row in page
        ])

    @extend_schema(
        operation_id="artifact_upload",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[OpenApiParameter("X-Content-SHA256", str, OpenApiParameter.HEADER, required=False)],
        responses={201: ArtifactOut, 200: ArtifactOut, 400: ErrorOut, 401: ErrorOut, 409: ErrorOut, 413: ErrorOut,
                   415: ErrorOut, 429: ErrorOut},
        description="Upload a blob; it is stored under its sha256. The same bytes twice store nothing new. A "
                    "person's upload past their storage quota answers 413 quota_exceeded and stores nothing "
                    "(docs/api/artifacts.md).",
    )
    def post(self, request):
        if request.content_type.split(";")[0].strip() != StreamParser.media_type:
            # 415 as the protocol says, before DRF would pick a parser for the body
            raise exceptions.UnsupportedMediaType(
                request.content_type, detail="send the bytes with Content-Type: application/octet-stream"
            )
        if not hasattr(request.data, "read"):
            # DRF hands over no stream when the request says it has no body (no or a zero Content-Length:
            # chunked transfer encoding counts as none); reading a dict was a 500 (found by schemathesis).
            raise ValidationFailed("the body is empty: send the artifact's bytes, with a Content-Length")
        device = request.auth if isinstance(request.auth, Device) else None
        artifact, created = artifact_store(
            chunks=_chunks(request.data),
            uploaded_by=None if device else request.user,
            device=device,
            declared_sha256=request.headers.get("X-Content-SHA256"),
            quota_of=None if device else request.user,
        )
        return Response(
            {"sha256": artifact.sha256, "size": artifact.size},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class ArtifactDownloadApi(APIView):
    """GET downloads (people and devices); DELETE stops holding it (people)."""

    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]

    def get_permissions(self):
        return [IsPerson()] if self.request.method == "DELETE" else super().get_permissions()

    @extend_schema(operation_id="artifact_download", responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
                   description="An artifact's bytes: yours, or (for a device) an input of its leases.")
    def get(self, request, sha256: str):
        if not is_sha256_hex(sha256):
            # No such name is stored; and PostgreSQL refuses a query on text holding U+0000 (".../%00/" was a 500).
            raise NotFound(f"no artifact {sha256[:64]!r}: artifacts are named by 64 lowercase hex digits")
        if isinstance(request.auth, Device):
            artifact = artifact_get_for_device(sha256=sha256, device=request.auth)
        else:
            artifact = artifact_get_for_user(sha256=sha256, user=request.user)
        return file_response(artifact)

    @extend_schema(
        operation_id="artifact_delete", responses={204: None, 401: ErrorOut, 403: ErrorOut, 404: ErrorOut, 409: ErrorOut},
        description="Stop holding the artifact: it leaves your list and your quota. 409 artifact_in_use while a job "
                    "of yours that has not ended uses it; 404 if you do not hold it. The bytes are removed once no "
                    "one holds them and nothing references them (docs/api/artifacts.md).",
    )
    def delete(self, request, sha256: str):
        artifact_delete(owner=request.user, sha256=sha256)
        return Response(status=status.HTTP_204_NO_CONTENT)


def file_response(artifact: Artifact, *, filename: str | None = None) -> FileResponse:
    """The artifact's bytes, streamed from storage as they are read (FileResponse closes the stream)."""
    response = FileResponse(
        get_storage().open(artifact.sha256),
        content_type="application/octet-stream",
        as_attachment=filename is not None,
        filename=filename or artifact.sha256,
    )
    # A file tells FileResponse its length; an object store's HTTP body does not: the row knows it.
    if not response.has_header("Content-Length"):
        response["Content-Length"] = str(artifact.size)
    response["X-Content-SHA256"] = artifact.sha256
    return response
