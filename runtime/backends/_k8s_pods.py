"""Reading pods: readiness, exits and startup failures, from the status the kubelet reports."""

from __future__ import annotations

from typing import Any

from runtime.backends._k8s_manifests import CONTAINER

# Waiting reasons that no amount of waiting fixes: the start fails at once with the kubelet's words.
_HOPELESS = {"ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}


def pod_key(pod: dict[str, Any]) -> tuple[str, str]:
    meta = pod["metadata"]
    return str(meta.get("namespace", "")), str(meta["name"])


def is_ready(pod: dict[str, Any]) -> bool:
    """The pod's ``Ready`` condition is True (its readiness probe passes; Services route to it)."""
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def is_terminating(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def container_status(pod: dict[str, Any]) -> dict[str, Any] | None:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else None)


def exit_of(status: dict[str, Any], restarts: int) -> tuple[int | None, bool]:
    """The exit status and OOM flag of the container an instance ran in (``restarts``: its restart count
    when it was claimed): its terminated state, or the last one once the kubelet restarted it."""
    terminated = (status.get("state") or {}).get("terminated")
    if terminated is None and int(status.get("restartCount", 0)) > restarts:
        terminated = (status.get("lastState") or {}).get("terminated")
    if terminated is None:
        return None, False
    return int(terminated.get("exitCode", 0)), terminated.get("reason") == "OOMKilled"


def failure_of(pod: dict[str, Any]) -> tuple[str, int | None, bool] | None:
    """Why a pod that is still starting will not become an instance (``None``: it may yet): what
    happened (completing "The app ..."), its exit code, and whether it ran out of memory."""
    status = container_status(pod)
    if status is None:
        return None
    state = status.get("state") or {}
    terminated = state.get("terminated") or (
        (status.get("lastState") or {}).get("terminated") if int(status.get("restartCount", 0)) > 0 else None
    )
    if terminated is not None:
        oom = terminated.get("reason") == "OOMKilled"
        what = "ran out of memory during startup" if oom else "exited during startup"
        return what, int(terminated.get("exitCode", 0)), oom
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in _HOPELESS:
        return (
            f"could not be started: {waiting['reason']}: {waiting.get('message', '')}".rstrip(": "),
            None,
            False,
        )
    return None
