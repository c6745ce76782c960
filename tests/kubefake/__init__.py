"""A FAKE Kubernetes cluster for tests: a real HTTP API server on 127.0.0.1 that the official
``kubernetes`` client talks to through a generated kubeconfig, fake controllers, and a fake kubelet
that runs every pod as Docker containers on the local engine. No cluster can run on these machines;
this is the faithful stand-in (``tests/test_kubernetes_fake.py`` pins its semantics), not a mock:

    FakeCluster ── ApiServer (server.py)      REST paths, apply/merge/strategic/JSON patches, watches
               ├── Store (store.py)           resourceVersions, managedFields, the event log
               ├── Controllers (controllers.py) Deployment, ReplicaSet, EndpointSlice, GC, HPA, PDB,
               │                              scheduler with preemption
               └── Kubelet (kubelet.py)       sandbox + containers per pod, probes, restarts, logs

``with FakeCluster(run_pods=False) as cluster:`` gives the API and the controllers only (pods are
scheduled but never run): enough for the API semantics, no Docker needed.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.kubefake.controllers import Controllers
from tests.kubefake.resources import kind_of
from tests.kubefake.server import ApiServer, validate
from tests.kubefake.store import ApiError, Store

__all__ = ["NODE", "ApiError", "FakeCluster"]

NODE = "kubefake-node"


class FakeCluster:
    """Start with ``with`` (or :meth:`start`/:meth:`stop`); ``kubeconfig`` is the file to hand a client."""

    def __init__(
        self,
        directory: Path,
        *,
        run_pods: bool = True,
        sandbox_image: str = "",
        stand_ins: dict[str, tuple[str, list[str]]] | None = None,
        restart_backoff: float = 10.0,
        node_cpu: str = "8",
        node_memory: str = "16Gi",
    ) -> None:
        self.directory = directory
        self.store = Store()
        self.store.validator = validate
        self.token = secrets.token_hex(16)
        self.api = ApiServer(self, self.token)
        self.controllers = Controllers(self.store, self.admit, node=NODE)
        self.kubelet: Any = None
        if run_pods:
            from tests.kubefake.kubelet import Kubelet

            self.kubelet = Kubelet(
                self.store,
                NODE,
                sandbox_image=sandbox_image,
                stand_ins=stand_ins,
                restart_backoff=restart_backoff,
            )
        self.node_cpu, self.node_memory = node_cpu, node_memory
        self.kubeconfig = directory / "kubeconfig"

    def start(self) -> FakeCluster:
        for name in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.store.create(kind_of("Namespace"), None, {"metadata": {"name": name}}, manager="kubefake")
        node = {
            "metadata": {
                "name": NODE,
                "labels": {
                    "kubernetes.io/hostname": NODE,
                    "kubernetes.io/os": "linux",
                    "topology.kubernetes.io/zone": "kubefake-a",
                },
            },
            "status": {
                "allocatable": {"cpu": self.node_cpu, "memory": self.node_memory, "pods": "110"},
                "capacity": {"cpu": self.node_cpu, "memory": self.node_memory, "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        }
        self.store.create(kind_of("Node"), None, node, manager="kubefake")
        self.api.start()
        self.controllers.start()
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.kubelet is not None:
            self.kubelet.start()
            # Pods reach the API as in a cluster: a TLS endpoint and a service account token mounted.
            port, accounts = self.api.serve_pods(self.kubelet.node_ip, self.directory / "in-cluster")
            self.kubelet.api_endpoint = (self.kubelet.node_ip, port)
            self.kubelet.service_accounts = accounts
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kubefake", "cluster": {"server": self.api.url}}],
            "users": [{"name": "kubefake", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "kubefake",
                    "context": {"cluster": "kubefake", "user": "kubefake", "namespace": "default"},
                }
            ],
            "current-context": "kubefake",
        }
        self.kubeconfig.write_text(json.dumps(config))
        return self

    def stop(self) -> None:
        self.controllers.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.api.stop()

    def __enter__(self) -> FakeCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def admit(self, obj: dict[str, Any]) -> None:
        """Admission: a pod's ``priorityClassName`` resolves to ``spec.priority`` (404 → rejected)."""
        if obj.get("kind") != "Pod":
            return
        name = obj["spec"].get("priorityClassName")
        if not name:
            obj["spec"].setdefault("priority", 0)
            return
        found = self.store.find(kind_of("PriorityClass"), None, name)
        if found is None:
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{obj["metadata"].get("name", "")}" is forbidden: '
                f"no PriorityClass with name {name} was found",
            )
        obj["spec"]["priority"] = int(found["value"])

    def client(self) -> Any:
        """An official ``kubernetes.client.ApiClient`` configured from the kubeconfig."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))
