# ruff: noqa
# fmt: off
"""Routers with prefixes, included with more prefixes (one twice), and a router nested in a router."""

from fastapi import FastAPI

from routers import items, users

app = FastAPI(dependencies=[])
app.include_router(items.router, prefix="/v1")
app.include_router(users.router)
app.include_router(items.router, prefix="/v2")
