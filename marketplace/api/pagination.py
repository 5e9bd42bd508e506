"""The one way every list in the API pages: an opaque cursor, newest first, stable under inserts.

DRF's CursorPagination over the primary key: a page is `{"next": url|null, "previous": url|null,
"results": [...]}`; follow `next` until it is null. Rows created while a client pages never shift the
pages it has not read yet (an offset would), and a page costs an index range scan however deep it is.
`limit` picks the page size (1..MAX_PAGE_SIZE, default PAGE_SIZE). A cursor is opaque: one that was not
given out is refused (404 not_found with DRF's "Invalid cursor").
"""

from __future__ import annotations

from rest_framework.pagination import CursorPagination

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


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
