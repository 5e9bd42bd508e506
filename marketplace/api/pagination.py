"""The one way every list in the API pages: an opaque cursor, newest first, stable under inserts.

DRF's CursorPagination over the primary key: a page is `{"next": url|null, "previous": url|null,
"results": [...]}`; follow `next` until it is null. Rows created while a client pages never shift the
pages it has not read yet (an offset would), and a page costs an index range scan however deep it is.
`limit` picks the page size, 1..MAX_PAGE_SIZE (default PAGE_SIZE): any other value is refused (400
invalid), never silently replaced by the default as DRF does. A cursor is opaque: one that was not given
out is refused (404 not_found with DRF's "Invalid cursor"), a forged position included.
"""

from __future__ import annotations

from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination

from marketplace.core.exceptions import ValidationFailed

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
MAX_ID = 2**63 - 1  # the largest primary key the databases hold


class IdCursorPagination(CursorPagination):
    ordering = "-id"  # unique and immutable: the cursor's position is never ambiguous
    page_size = PAGE_SIZE
    page_size_query_param = "limit"
    max_page_size = MAX_PAGE_SIZE
    page_size_query_description = f"results per page, 1..{MAX_PAGE_SIZE} (default {PAGE_SIZE})"
    cursor_query_description = "the opaque cursor of a page: take it from `next` or `previous`"

    def get_paginated_response_schema(self, schema):
        envelope = super().get_paginated_response_schema(schema)
        properties = envelope["properties"]
        properties["next"]["description"] = "the next (older) page's URL; null on the last page"
        properties["previous"]["description"] = "the previous (newer) page's URL; null on the first page"
        properties["results"]["description"] = f"this page's rows, newest first (`limit`, default {PAGE_SIZE})"
        return envelope
    def get_page_size(self, request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        # Bounded before int(): a 5000-digit string is refused by length, not parsed.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 3 and 1 <= int(raw) <= self.max_page_size):
            raise ValidationFailed(f"limit must be an integer 1..{self.max_page_size}",
                                   fields={"limit": f"not an integer 1..{self.max_page_size}"})
        return int(raw)

    def decode_cursor(self, request) -> Cursor | None:
        cursor = super().decode_cursor(request)
        # DRF passes the position to the query as it was sent: "p=abc" made `id < 'abc'`, a 500.
        if cursor is not None and cursor.position is not None and not _is_id(cursor.position):
            raise NotFound(self.invalid_cursor_message)
        return cursor


def _is_id(position: str) -> bool:
    return position.isascii() and position.isdigit() and len(position) <= 19 and int(position) <= MAX_ID
