# ruff: noqa
# fmt: off
"""Blocking calls reached through helpers in other modules: absolute, relative and re-exported imports."""

from fastapi import FastAPI

import app.storage as st
from app import routes
from app.services import fetch_json

app = FastAPI()
app.include_router(routes.router)


@app.get("/weather")
async def weather():
    return fetch_json("https://example.com/weather")


@app.get("/count")
async def count():
    return st.count_rows()
