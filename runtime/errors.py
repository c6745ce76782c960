"""Errors raised by the runtime: everything that touches user code and instances.

Every error a user can cause carries the four fields the official CLI prints for a failed
deployment (``error_code``, ``error_title``, ``error_message``, ``error_hint``); ``code`` doubles as
the deployment status the failure ends in when it is one of the FastAPI Cloud statuses.

    RuntimeFailure                       base: code, title, message, hint
    ├── ExtractionError                  extracting_failed: the upload is not a safe archive
    │   └── ArchiveTooLarge              extracting_failed_archive_too_large: size or ratio limits
    ├── BuildError                       building_image_failed: no entrypoint, dependency install failed, ...
    │   └── BuildTimeout                 building_image_failed_timeout
    ├── DeployError                      deploying_failed: the backend could not start an instance
    └── VerifyError                      verifying_failed: the app started but never became ready
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """A failure with a user-facing title, message and hint."""

    code = "failed"
    title = "Deployment failed"

    def __init__(self, message: str, *, hint: str = "", title: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if title is not None:
            self.title = title
        if code is not None:
            self.code = code

    def as_failure(self) -> dict[str, str]:
        """The ``failure`` object of the FastAPI Cloud Deployment shape (all four keys, strings)."""
        return {
            "error_code": self.code,
            "error_title": self.title,
            "error_message": self.message,
            "error_hint": self.hint,
        }


class ExtractionError(RuntimeFailure):
    code = "extracting_failed"
    title = "Extraction failed"


class ArchiveTooLarge(ExtractionError):
    code = "extracting_failed_archive_too_large"
    title = "Archive too large"


class BuildError(RuntimeFailure):
    code = "building_image_failed"
    title = "Build failed"


class BuildTimeout(BuildError):
    code = "building_image_failed_timeout"
    title = "Build timed out"


class DeployError(RuntimeFailure):
    code = "deploying_failed"
    title = "Deployment failed"


class VerifyError(RuntimeFailure):
    code = "verifying_failed"
    title = "Verification failed"


def not_ready(
    what: str, *, exit_code: int | None, tail: list[str], oom: bool, memory_mb: int | None
) -> VerifyError:
    """The error of an instance that never became ready, the same on every backend: ``what`` happened
    ("exited during startup", "did not answer on its health path /"), its exit code and last output;
    a kill at the memory limit gets its own title and hint."""
    suffix = f" (exit code {exit_code})" if exit_code is not None else ""
    output = (" Its last output:\n" + "\n".join(tail)) if tail else ""
    if oom:
        return VerifyError(
            "The app ran out of memory during startup: it was killed at its limit of "
            f"{memory_mb} MiB{suffix}.{output}",
            title="Out of memory",
            code="verification_failed_oom",
            hint="Make the app need less memory at startup, or ask the platform operator for larger "
            "instances (instance_memory_mb).",
        )
    return VerifyError(
        f"The app {what}{suffix}.{output}",
        hint="Run it locally with `fastapi run` to reproduce; the full output is in the app's logs.",
    )
