from django.contrib import admin
from django.http import JsonResponse
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView


def health(request):
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("marketplace.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="redoc"),
    path("healthz", health, name="health"),
    path("accounts/", include("allauth.urls")),
    path("", include("marketplace.portal.urls")),
]

# What never reaches a DRF view (an unknown path, a body past DATA_UPLOAD_MAX_MEMORY_SIZE, an uncaught
# error) answers the API's JSON error shape under /api/ too; Django's HTML pages stay for the rest.
handler400 = "marketplace.api.exception_handler.bad_request"
handler403 = "marketplace.api.exception_handler.permission_denied"
handler404 = "marketplace.api.exception_handler.not_found"
handler500 = "marketplace.api.exception_handler.server_error"
