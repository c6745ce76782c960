# ruff: noqa
# fmt: off
"""Code that looks blocking but is not: none of it may be reported."""

import asyncio
import functools
import time

import anyio
import anyio.to_thread
import httpx
import requests
from fastapi import BackgroundTasks, FastAPI
from fastapi.concurrency import run_in_threadpool
from starlette.concurrency import run_in_threadpool as starlette_threadpool

app = FastAPI()


@app.get("/sync")
def sync_endpoint():
    time.sleep(1)
    return requests.get("https://example.com").json()


@app.get("/awaited")
async def awaited():
    await asyncio.sleep(1)


@app.get("/threadpool")
async def threadpool():
    await run_in_threadpool(time.sleep, 1)
    await run_in_threadpool(requests.get, "https://example.com")
    await starlette_threadpool(lambda: time.sleep(1))


@app.get("/to-thread")
async def to_thread():
    await asyncio.to_thread(time.sleep, 1)
    await anyio.to_thread.run_sync(functools.partial(requests.get, "https://example.com"))
    await asyncio.to_thread(lambda: requests.get("https://example.com"))


@app.get("/executor")
async def executor():
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: requests.get("https://example.com"))
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 1)


@app.get("/httpx")
async def async_client():
    async with httpx.AsyncClient() as client:
        await client.get("https://example.com")
    other = httpx.AsyncClient()
    return await other.post("https://example.com")


@app.get("/local-requests")
async def local_requests():
    requests = []
    requests.append(1)
    return requests


@app.get("/param")
async def param(time: str = "now"):
    return time.split()


class Waiter:
    def sleep(self, seconds):
        return seconds

    async def run(self):
        return self.sleep(1)


@app.get("/method")
async def method():
    waiter = Waiter()
    waiter.sleep(1)
    return await waiter.run()


@app.get("/nested")
async def nested():
    def work():
        time.sleep(1)

    await run_in_threadpool(work)


@app.get("/background")
async def background(tasks: BackgroundTasks):
    tasks.add_task(time.sleep, 1)


@app.get("/anyio-path")
async def anyio_path():
    return await anyio.Path("data.txt").read_text()


@app.get("/subprocess")
async def async_subprocess():
    process = await asyncio.create_subprocess_exec("ls")
    await process.wait()


def never_called_from_async():
    time.sleep(1)


async def not_a_route():
    time.sleep(1)
