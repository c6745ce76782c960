# ruff: noqa
# fmt: off
"""Blocking calls in async dependencies: parameters, Annotated, sub-dependencies, route and router level."""

import sqlite3
import time
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Security


async def current_user():
    time.sleep(0.1)  # expect: time.sleep @ main.current_user | kind: dependency | routes: GET /admin/stats;GET /me
    return "alice"


async def db():
    return sqlite3.connect("app.db")  # expect: sqlite3.connect @ main.db | kind: dependency | routes: GET /data


def sync_dependency():
    time.sleep(0.1)  # a def dependency runs in the threadpool: not a finding
    return 1


async def needs_db(conn=Depends(db)):
    return conn


class Checker:
    async def __call__(self):
        time.sleep(0.05)  # expect: time.sleep @ main.Checker.__call__ | kind: dependency | routes: GET /admin/stats


checker = Checker()


async def api_key():
    time.sleep(0.01)  # expect: time.sleep @ main.api_key | kind: dependency | routes: GET /secure


app = FastAPI()
admin = APIRouter(prefix="/admin", dependencies=[Depends(current_user)])


@app.get("/me")
def me(user: Annotated[str, Depends(current_user)], n: int = Depends(sync_dependency)):
    return user


@app.get("/data")
async def data(conn=Depends(needs_db)):
    return {}


@app.get("/secure")
async def secure(key: str = Security(api_key)):
    return {}


@admin.get("/stats", dependencies=[Depends(checker)])
async def stats():
    return {}


app.include_router(admin)
