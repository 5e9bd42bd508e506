"""The event types a webhook endpoint can receive (docs/api/webhooks.md describes each payload)."""

from __future__ import annotations

JOB_STARTED = "job.started"  # split into units: running (jobs/services.py job_split)
JOB_PROGRESS = "job.progress"  # units decided; at most one per job per IDLEGRID_WEBHOOKS_PROGRESS_SECONDS
JOB_ROUND_COMPLETED = "job.round_completed"  # a fedavg round aggregated (jobs/rounds.py)
JOB_COMPLETED = "job.completed"  # the output is ready (jobs/lifecycle.py job_complete)
JOB_FAILED = "job.failed"  # jobs/lifecycle.py job_fail
JOB_CANCELLED = "job.cancelled"  # the submitter cancelled it (emitted where cancellation moves the state)
PAYOUT_EPOCH_PUBLISHED = "payout.epoch_published"  # an epoch's Merkle root is on chain: claimable
DEVICE_BANNED = "device.banned"  # one of your devices was banned (workunits/reverify.py device_ban)
WEBHOOK_TEST = "webhook.test"  # POST .../endpoints/{id}/test/: sent to that endpoint only

EVENT_TYPES = (JOB_STARTED, JOB_PROGRESS, JOB_ROUND_COMPLETED, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED,
               PAYOUT_EPOCH_PUBLISHED, DEVICE_BANNED)
