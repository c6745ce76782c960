"""What the kubernetes backend does beyond the conformance suite, on the FAKE cluster of tests/kubefake
(pods run as Docker containers of the image pushed to the test registry): exactly one pod per stop,
replicas owned by the scale subresource only, garbage after a restart, the HPA mode, node headroom."""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.backends.base import InstanceSpec, LogRecord
from runtime.detect import detect_project
from runtime.errors import DeployError
from runtime.images import BuiltImage, ImageMeta, build_image
from tests import dockerenv
from tests.kubefake import FakeCluster
from tests.kubefake.resources import kind_of

pytestmark = pytest.mark.anyio

APP = """
import os
from fastapi import FastAPI
app = FastAPI()

@app.get("/")
def root():
    return {"instance": os.environ["FASTAPI_DEPLOY_INSTANCE_ID"]}
"""
PAUSE = "registry.k8s.io/pause:3.10"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    dockerenv.require()
    if not dockerenv.REGISTRY:
        pytest.skip("no test registry (FASTAPI_DEPLOY_TEST_REGISTRY): Kubernetes runs images by digest")
    from runtime.backends.docker import DockerBackend
    from runtime.registry import Registry

    tmp = tmp_path_factory.mktemp("k8s-image")
    src = tmp / "src"
    src.mkdir()
    (src / "main.py").write_text(textwrap.dedent(APP))
    (src / "requirements.txt").write_text("fastapi\nuvicorn\n")
    engine = DockerBackend(tmp / "state", lambda record: None).images
    built = build_image(
        detect_project(src),
        src,
        ImageMeta(app_id="k8s", deployment_id=uuid.uuid4().hex, hostname="k8s.test"),
        engine=engine,
        cache_dir=tmp / "cache",
        base_image=dockerenv.BASE_IMAGE,
        log=lambda line: None,
        registry=Registry.parse(
            f"{dockerenv.REGISTRY}/k8s",
            username=dockerenv.REGISTRY_USERNAME,
            password=dockerenv.REGISTRY_PASSWORD,
        ),
    )
    yield built
    with dockerenv.connected() as client:
        client.images.remove(built.image_id, force=True)


@pytest.fixture(scope="module")
def cluster(image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    stand_ins = {PAUSE: (dockerenv.BASE_IMAGE, ["sleep", "infinity"])}  # pause cannot be pulled here
    with FakeCluster(
        tmp_path_factory.mktemp("kubefake"),
        sandbox_image=dockerenv.BASE_IMAGE,
        stand_ins=stand_ins,
        restart_backoff=1.0,
        node_cpu="2",
    ) as c:
        yield c


class World:
    def __init__(self, cluster: FakeCluster, image: BuiltImage) -> None:
        self.cluster, self.image = cluster, image
        self.namespace = f"k8s-{uuid.uuid4().hex[:8]}"
        self.logs: list[LogRecord] = []
        self.made: list[Any] = []

    def backend(self, **config: Any) -> Any:
        from runtime.backends.kubernetes import KubernetesBackend, KubernetesConfig

        for previous in self.made:
            previous.detach()
        settings = KubernetesConfig(
            namespace=self.namespace,
            platform_id=self.namespace,
            kubeconfig=str(self.cluster.kubeconfig),
            termination_grace=5,
            **config,
        )
        backend = KubernetesBackend(
            self.logs.append, images=None, config=settings, namespace_for=lambda app: self.namespace
        )
        self.made.append(backend)
        return backend

    def spec(self, **changes: Any) -> InstanceSpec:
        values: dict[str, Any] = {
            "app_id": "k8s",
            "deployment_id": f"dep-{uuid.uuid4().hex[:8]}",
            "hostname": "k8s.test",
            "python": Path(self.image.python),
            "entrypoint": self.image.entrypoint,
            "app_dir": Path(self.image.app_dir),
            "image": self.image.reference,
            **changes,
        }
        return InstanceSpec(**values)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.cluster.store.find(kind_of(kind), self.namespace, name)

    def pods(self, label: str = "") -> list[dict[str, Any]]:
        return self.cluster.store.list(kind_of("Pod"), self.namespace, label or None)[0]


@pytest.fixture
async def world(cluster: FakeCluster, image: BuiltImage) -> Any:
    w = World(cluster, image)
    yield w
    for backend in reversed(w.made):
        await backend.close(timeout=5)


async def eventually(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_stop_removes_exactly_that_pod_and_the_scaler_alone_owns_replicas(world: World) -> None:
    backend = world.backend()
    spec = world.spec()
    instances = list(await asyncio.gather(*(backend.start(spec, timeout=60) for _ in range(3))))
    victim, *others = instances

    await backend.stop(victim, timeout=10)

    names = {p["metadata"]["name"] for p in world.pods() if not p["metadata"].get("deletionTimestamp")}
    assert names == {i.id for i in others}
    deployment = world.get("Deployment", f"fdp-{spec.deployment_id}")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    owners = {
        (e["manager"], e["operation"], e.get("subresource")): e["fieldsV1"]
        for e in deployment["metadata"]["managedFields"]
    }
    assert "f:replicas" not in owners[("fastapi-deploy", "Apply", None)]["f:spec"]
    assert owners[("fastapi-deploy", "Update", "scale")] == {"f:spec": {"f:replicas": {}}}
    await backend.prepare(spec)  # a re-apply (a restarted control plane) leaves the count alone
    again = world.get("Deployment", f"fdp-{spec.deployment_id}")
    assert again is not None and again["spec"]["replicas"] == 2


async def test_recover_adopts_and_deletes_what_no_revision_claims(world: World) -> None:
    first = world.backend()
    serving, idle = world.spec(), world.spec()
    (instance,) = [await first.start(serving, timeout=60)]
    await first.prepare(idle)  # a revision with nothing running: garbage after a restart
    orphan = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "fdp-gone",
            "namespace": world.namespace,
            "labels": {"fastapi-deploy.dev/platform": world.namespace, "fastapi-deploy.dev/role": "app"},
        },
        "spec": {"ports": [{"port": 80}]},
    }
    world.cluster.store.create(kind_of("Service"), world.namespace, orphan, manager="someone")

    second = world.backend()
    adopted = await second.recover()

    assert [i.id for i in adopted] == [instance.id]
    assert world.get("Deployment", f"fdp-{idle.deployment_id}") is None
    assert world.get("Service", "fdp-gone") is None
    assert world.get("Deployment", f"fdp-{serving.deployment_id}") is not None
    await eventually(
        lambda: world.get("Service", f"fdp-{idle.deployment_id}") is None, "its Service collected"
    )


async def test_an_image_without_a_digest_is_refused(world: World) -> None:
    backend = world.backend()

    with pytest.raises(DeployError) as info:
        await backend.start(world.spec(image="k8s:latest"), timeout=5)

    assert "by digest" in info.value.message


async def test_in_the_hpa_mode_the_hpa_owns_replicas_and_the_floor_raises_them(world: World) -> None:
    backend = world.backend()
    spec = world.spec()

    await backend.autoscale(spec, min_replicas=1, max_replicas=3)
    with pytest.raises(DeployError):
        await backend.start(spec, timeout=5)
    await backend.set_floor(spec.deployment_id, 2)

    def ready() -> int:
        return len(
            [
                p
                for p in world.pods()
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in p.get("status", {}).get("conditions", [])
                )
            ]
        )

    await eventually(lambda: ready() == 2, "two Ready pods", timeout=60)
    rollout = await backend.rollout(spec.deployment_id)
    assert rollout["replicas"] == 2 and rollout["observed"]


async def test_headroom_placeholders_give_way_to_app_pods(world: World) -> None:
    backend = world.backend()
    await backend.set_headroom(3, cpus=0.5, memory_mb=64, namespace=world.namespace)  # the node has 2 cores
    await eventually(
        lambda: (
            len([p for p in world.pods("fastapi-deploy.dev/role=headroom") if p["spec"].get("nodeName")]) == 3
        ),
        "placeholders scheduled",
    )

    instances = list(
        await asyncio.gather(*(backend.start(world.spec(cpus=0.5), timeout=60) for _ in range(2)))
    )

    assert len(instances) == 2
    placeholders = [
        p
        for p in world.pods("fastapi-deploy.dev/role=headroom")
        if not p["metadata"].get("deletionTimestamp")
    ]
    unscheduled = [p for p in placeholders if not p["spec"].get("nodeName")]
    assert unscheduled, "a placeholder was preempted and waits for capacity (the cluster autoscaler's cue)"
    await backend.set_headroom(0, cpus=0.5, memory_mb=64, namespace=world.namespace)
