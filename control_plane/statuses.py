"""Deployment statuses: FastAPI Cloud's vocabulary (fastapi-cloud-api.md §4.8), in one place."""

from __future__ import annotations

import enum


class DeploymentStatus(enum.StrEnum):
    WAITING_UPLOAD = "waiting_upload"
    UPLOAD_CANCELLED = "upload_cancelled"
    READY_FOR_BUILD = "ready_for_build"
    BUILDING = "building"
    EXTRACTING = "extracting"
    EXTRACTING_FAILED = "extracting_failed"
    EXTRACTING_FAILED_ARCHIVE_TOO_LARGE = "extracting_failed_archive_too_large"
    BUILDING_IMAGE = "building_image"
    BUILDING_IMAGE_FAILED = "building_image_failed"
    BUILDING_IMAGE_FAILED_TIMEOUT = "building_image_failed_timeout"
    BUILD_SKIPPED_SUPERSEDED = "build_skipped_superseded"
    DEPLOYING = "deploying"
    DEPLOYING_FAILED = "deploying_failed"
    VERIFYING = "verifying"
    VERIFYING_FAILED = "verifying_failed"
    VERIFYING_SKIPPED = "verifying_skipped"
    VERIFICATION_FAILED_OOM = "verification_failed_oom"
    DEGRADED = "degraded"
    DEGRADED_OOM = "degraded_oom"
    EXPIRED = "expired"
    FAILED = "failed"
    SUCCESS = "success"


S = DeploymentStatus
SUCCESSFUL = frozenset({S.SUCCESS, S.VERIFYING_SKIPPED})
FAILED = frozenset(
    {
        S.EXTRACTING_FAILED,
        S.EXTRACTING_FAILED_ARCHIVE_TOO_LARGE,
        S.BUILDING_IMAGE_FAILED,
        S.BUILDING_IMAGE_FAILED_TIMEOUT,
        S.BUILD_SKIPPED_SUPERSEDED,
        S.DEPLOYING_FAILED,
        S.VERIFYING_FAILED,
        S.VERIFICATION_FAILED_OOM,
        S.DEGRADED,
        S.DEGRADED_OOM,
        S.EXPIRED,
        S.FAILED,
    }
)
TERMINAL = SUCCESSFUL | FAILED
DEGRADED = frozenset({S.DEGRADED, S.DEGRADED_OOM})
"""A live deployment that stopped being healthy (a crash loop, a stuck rollout); back to ``success`` when it
recovers (control_plane/fleet.py, ``Platform._on_health``)."""
WENT_LIVE = SUCCESSFUL | DEGRADED
"""Deployments that served: their builds are kept for rollback and can serve again."""
IN_PROGRESS = frozenset(
    {S.READY_FOR_BUILD, S.BUILDING, S.EXTRACTING, S.BUILDING_IMAGE, S.DEPLOYING, S.VERIFYING}
)
