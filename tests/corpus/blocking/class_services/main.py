# ruff: noqa
# fmt: off
"""Blocking calls behind the project's classes: attributes set in __init__, methods, inherited clients."""

from fastapi import Depends, FastAPI

from services import ApiClient, Repo, WeatherService

app = FastAPI()
service = WeatherService()


@app.get("/weather")
async def weather():
    return service.forecast()


@app.get("/repo")
async def repo(r: Repo = Depends()):
    return r.load()


@app.get("/client")
async def client():
    return ApiClient().fetch()
