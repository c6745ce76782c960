"""End to end on a REAL cluster, whatever ``KUBECONFIG`` points at (kind, k3d, a cloud cluster): the whole
flow of tests/clusterflow.py (the chart's routers in the cluster, a control plane on this machine, push,
route, trace, scale, logs, delete), and the kubernetes backend alone. Skipped when ``KUBECONFIG`` is unset;
marked ``kubernetes`` (a skip of it never fails CI, tests/conftest.py). With ``KUBECONFIG`` set, the flow
fails unless the cluster answers and its variables are set. docs/KUBERNETES.md says how to run it against
kind or k3d.

The whole flow needs ``FASTAPI_DEPLOY_TEST_K8S_REGISTRY`` (``host[:port]`` by which this machine pushes and
the nodes pull, ``_USERNAME``/``_PASSWORD`` if it needs them), ``FASTAPI_DEPLOY_TEST_K8S_HOST_ADDRESS`` (an
address of this machine the pods can connect to) and the docker test environment of scripts/test (the
platform's image and the apps are built on ``FASTAPI_DEPLOY_TEST_BASE_IMAGE``).

The backend test's image comes from ``FASTAPI_DEPLOY_TEST_K8S_IMAGE``: a digest reference the cluster
can pull (built and pushed by the platform's own builder, e.g. the conformance image pushed to a
registry the cluster reaches); pod IPs are usually not reachable from outside a cluster, so the app is
asked through the API server's pod proxy and the control-plane-side probe is off.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from runtime.backends.base import Instance, InstanceSpec, InstanceState, LogRecord
from tests import clusterflow, dockerenv

pytestmark = [pytest.mark.kubernetes]

KUBECONFIG = os.environ.get("KUBECONFIG", "")
IMAGE = os.environ.get("FASTAPI_DEPLOY_TEST_K8S_IMAGE", "")
PYTHON = os.environ.get("FASTAPI_DEPLOY_TEST_K8S_PYTHON", "/usr/bin/python3")


def _unavailable() -> str | None:
    if not KUBECONFIG:
        return "no cluster: KUBECONFIG is not set"
    if "@sha256:" not in IMAGE:
        return "FASTAPI_DEPLOY_TEST_K8S_IMAGE must name an image by digest that the cluster can pull"
    return _unreachable()


def _unreachable() -> str | None:
    """Why the cluster of ``KUBECONFIG`` does not answer (``None``: it does)."""
    try:
        from runtime.backends._k8s_client import Kube

        kube = Kube(KUBECONFIG)
        kube.request("GET", "/version")
        kube.close()
    except Exception as exc:
        return f"the cluster of KUBECONFIG is not reachable: {exc}"
    return None


REGISTRY = os.environ.get("FASTAPI_DEPLOY_TEST_K8S_REGISTRY", "")
HOST_ADDRESS = os.environ.get("FASTAPI_DEPLOY_TEST_K8S_HOST_ADDRESS", "")


def test_the_whole_flow_on_the_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not KUBECONFIG:
        pytest.skip("no cluster: KUBECONFIG is not set")
    missing = [
        name
        for name, value in (
            ("FASTAPI_DEPLOY_TEST_K8S_REGISTRY", REGISTRY),
            ("FASTAPI_DEPLOY_TEST_K8S_HOST_ADDRESS", HOST_ADDRESS),
        )
        if not value
    ]
    assert not missing, f"KUBECONFIG names a cluster but {', '.join(missing)} is not set (docs/KUBERNETES.md)"
    unreachable = _unreachable()
    assert unreachable is None, unreachable
    target = clusterflow.Target(
        kubeconfig=Path(KUBECONFIG),
        registry=REGISTRY,
        registry_username=os.environ.get("FASTAPI_DEPLOY_TEST_K8S_REGISTRY_USERNAME", ""),
        registry_password=os.environ.get("FASTAPI_DEPLOY_TEST_K8S_REGISTRY_PASSWORD", ""),
        host_address=HOST_ADDRESS,
        base_image=dockerenv.BASE_IMAGE,
    )
    clusterflow.run(target, request.getfixturevalue("platform_image"), tmp_path)


@pytest.fixture(scope="module")
def cluster() -> str:
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    return KUBECONFIG


def test_a_revision_starts_serves_stops_and_is_adopted_after_a_restart(cluster: str) -> None:
    from runtime.backends._k8s_client import Kube, path
    from runtime.backends.kubernetes import KubernetesBackend, KubernetesConfig

    namespace = f"fdp-e2e-{uuid.uuid4().hex[:6]}"
    config = KubernetesConfig(
        namespace=namespace,
        platform_id=namespace,
        kubeconfig=cluster,
        verify_from_control_plane=False,
        readiness_period=2,
    )
    spec = InstanceSpec(
        app_id="e2e",
        deployment_id=f"dep-{uuid.uuid4().hex[:8]}",
        hostname="e2e.test",
        python=Path(PYTHON),
        entrypoint="main:app",
        app_dir=Path("/app"),
        env={"GREETING": "hello"},
        image=IMAGE,
        memory_mb=256,
        cpus=0.25,
    )
    logs: list[LogRecord] = []
    kube = Kube(cluster)

    async def scenario() -> None:
        first = KubernetesBackend(
            logs.append, images=None, config=config, namespace_for=lambda app: namespace
        )
        instances: list[Instance] = list(
            await asyncio.gather(*(first.start(spec, timeout=180) for _ in range(2)))
        )
        assert all(i.state == InstanceState.WARM for i in instances)
        proxy = path("Pod", namespace, instances[0].id, "proxy")
        answer = await asyncio.to_thread(
            kube.request, "GET", f"{proxy.rsplit('/proxy', 1)[0]}:8000/proxy/env"
        )
        assert answer["GREETING"] == "hello"
        first.detach()  # the control plane "crashes": the pods serve on
        second = KubernetesBackend(
            logs.append, images=None, config=config, namespace_for=lambda app: namespace
        )
        adopted = await second.recover()
        assert sorted(i.id for i in adopted) == sorted(i.id for i in instances)
        await second.stop(adopted[0], timeout=30)
        assert adopted[0].state == InstanceState.STOPPED
        scale = await asyncio.to_thread(
            kube.request, "GET", path("Deployment", namespace, f"fdp-{spec.deployment_id}", "scale")
        )
        assert scale["spec"]["replicas"] == 1
        await second.release(spec.deployment_id)
        await second.close(timeout=30)

    try:
        asyncio.run(scenario())
    finally:
        kube.delete("Namespace", None, namespace)
        kube.close()
