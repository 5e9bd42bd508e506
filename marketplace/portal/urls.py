"""The portal's pages: each view module owns its paths (landing, submitter, contributor, tokens)."""

from marketplace.portal.views import contributor, landing, submitter, tokens

app_name = "portal"

urlpatterns = [*landing.urlpatterns, *submitter.urlpatterns, *contributor.urlpatterns, *tokens.urlpatterns]
