from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import exceptions, parsers, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from marketplace.api.authentication import DeviceAuthentication
from marketplace.artifacts.models import Artifact
from marketplace.artifacts.services import artifact_store
from marketplace.artifacts.storage import get_storage
from marketplace.core.exceptions import NotFound, ValidationFailed
from marketplace.jobs.selectors import artifact_get_for_user
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


class ArtifactUploadApi(APIView):
    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]
    parser_classes = [StreamParser]
    throttle_scope = "upload"

    @extend_schema(
        operation_id="artifact_upload",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[OpenApiParameter("X-Content-SHA256", str, OpenApiParameter.HEADER, required=False)],
        responses={201: ArtifactOut, 200: ArtifactOut},
        description="Upload a blob; it is stored under its sha256. The same bytes twice store nothing new.",
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
        )
        return Response(
            {"sha256": artifact.sha256, "size": artifact.size},
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class ArtifactDownloadApi(APIView):
    authentication_classes = [DeviceAuthentication, *APIView.authentication_classes]

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
