# ruff: noqa
# fmt: off
"""Blocking calls made directly in async endpoints of every kind of route."""

import time

import requests
from fastapi import FastAPI, WebSocket

app = FastAPI()


@app.get("/sleep")
async def sleepy():
    time.sleep(1)  # expect: time.sleep @ main.sleepy | routes: GET /sleep | chain: main.sleepy > time.sleep
    return {}


@app.post("/fetch")
async def fetch():
    return requests.get("https://example.com").json()  # expect: requests.get @ main.fetch | routes: POST /fetch


@app.api_route("/both", methods=["GET", "post"])
async def both():
    requests.post("https://example.com", json={})  # expect: requests.post @ main.both | routes: GET /both;POST /both


@app.websocket("/ws")
async def ws(websocket: WebSocket):
    await websocket.accept()
    time.sleep(0.1)  # expect: time.sleep @ main.ws | routes: WEBSOCKET /ws


@app.delete("/items/{item_id}")
@app.patch("/items/{item_id}")
async def two_routes(item_id: int):
    time.sleep(0.1)  # expect: time.sleep @ main.two_routes | routes: DELETE /items/{item_id};PATCH /items/{item_id}
