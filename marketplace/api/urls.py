from django.urls import path

from marketplace.api.v1 import accounts, agent, artifacts, auth, jobs, ledger, webhooks

app_name = "api"

urlpatterns = [
    # The login view names no parser classes: it parses with the API's default, the bounded JSON parser.
    path("auth/token/", auth.TokenCreateApi.as_view(), name="token"),
    path("auth/tokens/", auth.TokenListApi.as_view(), name="token-list"),
    path("auth/tokens/<str:token_key>/", auth.TokenRevokeApi.as_view(), name="token-revoke"),
    path("auth/logout/", auth.LogoutApi.as_view(), name="logout"),
    path("auth/logout-all/", auth.LogoutAllApi.as_view(), name="logout-all"),
    path("artifacts/", artifacts.ArtifactUploadApi.as_view(), name="artifact-upload"),
    path("artifacts/<str:sha256>/", artifacts.ArtifactDownloadApi.as_view(), name="artifact-download"),
    path("jobs/", jobs.JobCreateApi.as_view(), name="job-create"),
    path("jobs/quote/", jobs.JobQuoteApi.as_view(), name="job-quote"),
    path("jobs/<int:job_id>/", jobs.JobDetailApi.as_view(), name="job-detail"),
    path("jobs/<int:job_id>/output/", jobs.JobOutputApi.as_view(), name="job-output"),
    path("jobs/<int:job_id>/rounds/", jobs.JobRoundsApi.as_view(), name="job-rounds"),
    path("jobs/<int:job_id>/cancel/", jobs.JobCancelApi.as_view(), name="job-cancel"),
    path("enrollment-tokens/", accounts.EnrollmentTokenCreateApi.as_view(), name="enrollment-token-create"),
    path("devices/", accounts.DeviceListApi.as_view(), name="device-list"),
    path("ledger/balances/", ledger.BalancesApi.as_view(), name="ledger-balances"),
    path("ledger/entries/", ledger.EntriesApi.as_view(), name="ledger-entries"),
    path("wallet/challenge/", ledger.WalletChallengeApi.as_view(), name="wallet-challenge"),
    path("wallet/", ledger.WalletApi.as_view(), name="wallet"),
    path("wallet/pending/", ledger.WalletPendingApi.as_view(), name="wallet-pending"),
    path("payouts/proof/", ledger.PayoutProofApi.as_view(), name="payout-proof"),
    path("webhooks/endpoints/", webhooks.EndpointListApi.as_view(), name="webhook-endpoint-list"),
    path("webhooks/endpoints/<int:endpoint_id>/", webhooks.EndpointDetailApi.as_view(), name="webhook-endpoint-detail"),
    path("webhooks/endpoints/<int:endpoint_id>/rotate-secret/", webhooks.EndpointRotateSecretApi.as_view(),
         name="webhook-endpoint-rotate-secret"),
    path("webhooks/endpoints/<int:endpoint_id>/test/", webhooks.EndpointTestApi.as_view(), name="webhook-endpoint-test"),
    path("webhooks/deliveries/", webhooks.DeliveryListApi.as_view(), name="webhook-delivery-list"),
    path("webhooks/deliveries/<int:delivery_id>/", webhooks.DeliveryDetailApi.as_view(), name="webhook-delivery-detail"),
    path("webhooks/deliveries/<int:delivery_id>/replay/", webhooks.DeliveryReplayApi.as_view(),
         name="webhook-delivery-replay"),
    path("agent/enroll", agent.EnrollApi.as_view(), name="agent-enroll"),
    path("agent/keys", agent.KeysApi.as_view(), name="agent-keys"),
    path("agent/lease", agent.LeaseApi.as_view(), name="agent-lease"),
    path("agent/heartbeat", agent.HeartbeatApi.as_view(), name="agent-heartbeat"),
    path("agent/earnings", agent.EarningsApi.as_view(), name="agent-earnings"),
    path("agent/results/<int:result_id>/report", agent.ReportApi.as_view(), name="agent-report"),
    path("agent/reports", agent.ReportsApi.as_view(), name="agent-reports"),
    path("agent/results/<int:result_id>/fail", agent.FailApi.as_view(), name="agent-fail"),
    path("agent/results/<int:result_id>/release", agent.ReleaseApi.as_view(), name="agent-release"),
]
