"""What OPTIONS answers: the view's name, description, and the media types it renders and parses.

DRF's SimpleMetadata also describes the serializer of each write method ("actions"), by calling the view's
get_serializer(); a GenericAPIView here names no serializer_class (its operations build their own, as
nested classes), so that call was an AssertionError: a 500 for any OPTIONS on a list-and-create path
(found by schemathesis). The OpenAPI document at /api/schema/ is the description of every body; OPTIONS
does not repeat it.
"""

from __future__ import annotations

from rest_framework.metadata import SimpleMetadata


class ViewMetadata(SimpleMetadata):
    def determine_actions(self, request, view):
        return {}

    def determine_metadata(self, request, view):
        metadata = super().determine_metadata(request, view)
        metadata.pop("actions", None)
        metadata["schema"] = "/api/schema/"
        return metadata
