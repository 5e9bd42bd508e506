"""Schema pieces shared by the API modules."""

from __future__ import annotations

from rest_framework import serializers


class ErrorBody(serializers.Serializer):
    code = serializers.CharField(help_text="stable, for programs: invalid, not_authenticated, throttled, ...")
    message = serializers.CharField(help_text="for people")
    fields = serializers.DictField(help_text="request field -> its problem")


class ErrorOut(serializers.Serializer):
    """Every error's shape (marketplace/api/exception_handler.py); a 429 also carries Retry-After (seconds)."""

    error = ErrorBody()
