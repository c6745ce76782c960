# ruff: noqa
# fmt: off
"""The blocking APIs under other names: module aliases, imported functions, local aliases."""

import time as t
import urllib.request
from subprocess import run as sh
from time import sleep
from time import sleep as snooze

import requests as http
from fastapi import FastAPI
from requests import Session, get

app = FastAPI()


@app.get("/a")
async def a():
    t.sleep(1)  # expect: time.sleep @ main.a


@app.get("/b")
async def b():
    sleep(1)  # expect: time.sleep @ main.b


@app.get("/c")
async def c():
    snooze(1)  # expect: time.sleep @ main.c


@app.get("/d")
async def d():
    get("https://example.com")  # expect: requests.get @ main.d


@app.get("/e")
async def e():
    http.delete("https://example.com")  # expect: requests.delete @ main.e


@app.get("/f")
async def f():
    urllib.request.urlopen("https://example.com")  # expect: urllib.request.urlopen @ main.f


@app.get("/g")
async def g():
    session = Session()
    session.get("https://example.com")  # expect: requests.Session.get @ main.g


@app.get("/h")
async def h():
    nap = t.sleep
    nap(1)  # expect: time.sleep @ main.h


@app.get("/i")
async def i():
    sh(["ls"])  # expect: subprocess.run @ main.i


@app.get("/j")
async def j():
    with http.Session() as s:
        s.post("https://example.com")  # expect: requests.Session.post @ main.j


@app.get("/k")
async def k():
    import time as clock

    clock.sleep(1)  # expect: time.sleep @ main.k
