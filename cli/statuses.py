"""Deployment statuses: the one table that says which are terminal and which succeeded.

The vocabulary is FastAPI Cloud's (fastapi-cloud-api.md §4.8, the same as the official client's
``DeploymentStatus``). A value we do not know becomes ``UNKNOWN``, which is not terminal: like the official
client, we keep polling rather than guess.
"""

from __future__ import annotations

import enum


class Status(enum.StrEnum):
    WAITING_UPLOAD = "waiting_upload"
    UPLOAD_CANCELLED = "upload_cancelled"
    READY_FOR_BUILD = "ready_for_build"
    BUILDING = "building"
    EXTRACTING = "extracting"
    BUILDING_IMAGE = "building_image"
    DEPLOYING = "deploying"
    VERIFYING = "verifying"
    EXTRACTING_FAILED = "extracting_failed"
    EXTRACTING_FAILED_ARCHIVE_TOO_LARGE = "extracting_failed_archive_too_large"
    BUILDING_IMAGE_FAILED = "building_image_failed"
    BUILDING_IMAGE_FAILED_TIMEOUT = "building_image_failed_timeout"
    BUILD_SKIPPED_FILTERED = "build_skipped_filtered"
    BUILD_SKIPPED_SUPERSEDED = "build_skipped_superseded"
    DEPLOYING_SKIPPED = "deploying_skipped"
    DEPLOYING_FAILED = "deploying_failed"
    VERIFYING_FAILED = "verifying_failed"
    VERIFICATION_FAILED_OOM = "verification_failed_oom"
    DEGRADED = "degraded"
    DEGRADED_OOM = "degraded_oom"
    EXPIRED = "expired"
    FAILED = "failed"
    SUCCESS = "success"
    VERIFYING_SKIPPED = "verifying_skipped"
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> Status:
        return cls.UNKNOWN


class Outcome(enum.Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    BUILD_FAILED = "build_failed"  # failed before an image existed: the build log says why


_P, _S, _F, _B = Outcome.PENDING, Outcome.SUCCEEDED, Outcome.FAILED, Outcome.BUILD_FAILED

# status -> (human label, outcome). upload_cancelled is *not* terminal in the official client (a cancelled
# upload can be retried); we keep its classification so both clients agree.
TABLE: dict[Status, tuple[str, Outcome]] = {
    Status.WAITING_UPLOAD: ("Awaiting Upload", _P),
    Status.UPLOAD_CANCELLED: ("Upload Cancelled", _P),
    Status.READY_FOR_BUILD: ("Build Queued", _P),
    Status.BUILDING: ("Building", _P),
    Status.EXTRACTING: ("Extracting Upload", _P),
    Status.BUILDING_IMAGE: ("Building Image", _P),
    Status.DEPLOYING: ("Deploying Image", _P),
    Status.VERIFYING: ("Verifying Readiness", _P),
    Status.EXTRACTING_FAILED: ("Extraction Failed", _B),
    Status.EXTRACTING_FAILED_ARCHIVE_TOO_LARGE: ("Archive Too Large", _B),
    Status.BUILDING_IMAGE_FAILED: ("Build Failed", _B),
    Status.BUILDING_IMAGE_FAILED_TIMEOUT: ("Build Timed Out", _B),
    Status.BUILD_SKIPPED_FILTERED: ("Build Skipped (Filtered)", _F),
    Status.BUILD_SKIPPED_SUPERSEDED: ("Build Skipped (Superseded)", _F),
    Status.DEPLOYING_SKIPPED: ("Deployment Skipped", _F),
    Status.DEPLOYING_FAILED: ("Deployment Failed", _F),
    Status.VERIFYING_FAILED: ("Verification Failed", _F),
    Status.VERIFICATION_FAILED_OOM: ("Verification Failed (OOM)", _F),
    Status.DEGRADED: ("Degraded", _F),
    Status.DEGRADED_OOM: ("Degraded (OOM)", _F),
    Status.EXPIRED: ("Expired", _F),
    Status.FAILED: ("Failed", _F),
    Status.SUCCESS: ("Ready", _S),
    Status.VERIFYING_SKIPPED: ("Verification Skipped", _S),
    Status.UNKNOWN: ("Unknown", _P),
}


def outcome(status: str) -> Outcome:
    """Classify a status string from the API; unknown values are ``PENDING``."""
    return TABLE[Status(status)][1]


def label(status: str) -> str:
    """The human label ("Verifying Readiness"); unknown values keep their raw text."""
    parsed = Status(status)
    return status if parsed is Status.UNKNOWN else TABLE[parsed][0]


def is_terminal(status: str) -> bool:
    return outcome(status) is not Outcome.PENDING


def is_success(status: str) -> bool:
    return outcome(status) is Outcome.SUCCEEDED


def is_failure(status: str) -> bool:
    return outcome(status) in (Outcome.FAILED, Outcome.BUILD_FAILED)
