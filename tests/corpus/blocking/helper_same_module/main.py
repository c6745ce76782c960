# ruff: noqa
# fmt: off
"""Blocking calls reached through the module's own helper functions, sync and async."""

import time

import requests
from fastapi import FastAPI

app = FastAPI()


def wait_a_bit():
    time.sleep(0.5)  # expect: time.sleep @ main.slow | chain: main.slow > main.outer > main.wait_a_bit > time.sleep


def outer():
    wait_a_bit()


def load(url):
    return requests.get(url)  # expect: requests.get @ main.load_items | chain: main.load_items > main.load > requests.get


@app.get("/slow")
async def slow():
    outer()


@app.get("/items")
async def load_items():
    return load("https://example.com")


@app.get("/sync-items")
def sync_items():
    return load("https://example.com")  # a def endpoint runs in the threadpool: not a finding


async def async_helper():
    time.sleep(0.2)  # expect: time.sleep @ main.awaits_helper


@app.get("/awaits-helper")
async def awaits_helper():
    await async_helper()


def ping(n):
    if n:
        pong(n - 1)
    time.sleep(0.01)  # expect: time.sleep @ main.recursive | chain: main.recursive > main.ping > time.sleep


def pong(n):
    ping(n)


@app.get("/recursive")
async def recursive():
    ping(3)
