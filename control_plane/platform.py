"""The platform: every long-lived part of the control plane, built from Settings, started and stopped
in order. The FastAPI app holds one in ``app.state.platform``; API handlers reach the parts through it.

    start:  database (migrations) → bootstrap admin → log store → router → backend recovery
            → restore serving apps → ready
    stop:   stop accepting deploys → router stops (drains) → instances stop → database closes
"""

from __future__ import annotations

import asyncio
import logging
import secrets as pysecrets
from dataclasses import dataclass

from sqlmodel import select

from control_plane.buildlogs import BuildLogs
from control_plane.config import Settings
from control_plane.db import Database
from control_plane.deployer import Deployer, Paths
from control_plane.events import EventLog
from control_plane.fleet import Fleet
from control_plane.forecast import Forecaster
from control_plane.logstore import LogStore
from control_plane.models import ApiToken, Membership, Setting, Team, User
from control_plane.secrets import SecretBox
from control_plane.security import hash_token, new_token
from runtime.backends.base import Backend
from runtime.backends.process import ProcessBackend
from runtime.router import Router

log = logging.getLogger("fastapi_deploy")


@dataclass
class Bootstrap:
    """What the first start created; the admin token is only known (and printed) then."""

    admin_email: str
    admin_token: str | None


class Platform:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings.data_dir)
        for d in (settings.data_dir, self.paths.deployments, self.paths.envs, self.paths.instances):
            d.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.sqlalchemy_url)
        self.secrets = SecretBox.from_config(settings.data_dir, settings.extra.get("secret_keys", ""))
        self.logstore = LogStore(self.paths.logs, settings.log_retention_bytes)
        self.buildlogs = BuildLogs(self.db)
        self.router = Router()
        self.backend: Backend
        if settings.backend == "docker":
            from runtime.backends.docker import DockerBackend  # the docker extra: imported only when chosen
            from runtime.registry import Registry

            registry = None
            if settings.registry:
                registry = Registry.parse(
                    settings.registry,
                    username=settings.registry_username,
                    password=settings.registry_password,
                )
            self.backend = DockerBackend(self.paths.instances, self.logstore.append, registry=registry)
        elif settings.backend == "process":
            self.backend = ProcessBackend(self.paths.instances, self.logstore.append)
        else:
            raise ValueError(f"unknown backend {settings.backend!r} (available: process, docker)")
        self.events = EventLog(self.db)
        self.forecaster = Forecaster(self.db)
        self.fleet = Fleet(
            self.backend,
            self.router,
            verify_timeout=settings.verify_timeout,
            drain_timeout=settings.drain_timeout,
            events=self.events,
            forecaster=self.forecaster,
        )
        self.backend.on_exit = self.fleet.on_exit
        self.deployer = Deployer(settings, self.db, self.fleet, self.buildlogs, self.secrets)
        self.bootstrap: Bootstrap | None = None
        self.ready = asyncio.Event()
        self._autoscaler: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.db.migrate)
        self.bootstrap = await asyncio.to_thread(self._bootstrap)
        self.buildlogs.bind(asyncio.get_running_loop())
        await asyncio.to_thread(self.forecaster.load)
        self.events.start()
        await self.router.start(self.settings.router_host, self.settings.router_port)
        await self.backend.recover()
        await self.deployer.restore()
        self._autoscaler = asyncio.get_running_loop().create_task(self.fleet.run(), name="autoscaler")
        self.ready.set()

    async def stop(self) -> None:
        self.ready.clear()
        if self._autoscaler is not None:
            self._autoscaler.cancel()
            await asyncio.gather(self._autoscaler, return_exceptions=True)
        await self.deployer.close()
        await self.router.stop(timeout=5.0)
        await self.fleet.close()
        await self.events.stop()
        self.logstore.close()
        self.db.dispose()

    def _bootstrap(self) -> Bootstrap:
        """On the first start: the admin user (a password too when configured), their team, their API token.

        Later starts change nothing, except that a platform left without any enabled admin gets the
        configured admin back (enabled, admin again, with a new token printed once): the way back in.
        """
        from control_plane.passwords import hash_password

        with self.db.session() as s:
            done = s.get(Setting, "bootstrapped")
            admin = s.exec(
                select(User).where(User.is_admin == True, User.disabled == False)  # noqa: E712
            ).first()
            if done is not None and admin is not None:
                return Bootstrap(admin_email=admin.email, admin_token=None)
            email = self.settings.admin_email.strip().lower()
            admin = s.exec(select(User).where(User.email == email)).first() or User(email=email, name="Admin")
            admin.is_admin, admin.disabled = True, False
            if self.settings.admin_password and admin.password_hash is None:
                admin.password_hash = hash_password(self.settings.admin_password)
            s.add(admin)
            team = s.exec(select(Team).where(Team.slug == "default")).first()
            if team is None:
                team = Team(slug="default", name="Default")
                s.add(team)
            s.flush()
            if s.get(Membership, (team.id, admin.id)) is None:
                s.add(Membership(team_id=team.id, user_id=admin.id, role="owner"))
            raw = self.settings.admin_token or new_token()
            if s.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(raw))).first() is None:
                s.add(
                    ApiToken(
                        token_hash=hash_token(raw), kind="user", user_id=admin.id, name="admin (bootstrap)"
                    )
                )
            if done is None:
                s.add(Setting(key="bootstrapped", value="1"))
            if s.get(Setting, "instance_id") is None:
                s.add(Setting(key="instance_id", value=pysecrets.token_hex(8)))
            s.commit()
            return Bootstrap(admin_email=admin.email, admin_token=raw)
