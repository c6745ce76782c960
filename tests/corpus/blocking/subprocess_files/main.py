# ruff: noqa
# fmt: off
"""Subprocesses and synchronous file I/O in async endpoints."""

import os
import shutil
import subprocess
from pathlib import Path

from fastapi import FastAPI

BASE = Path(__file__).parent
app = FastAPI()


@app.post("/run")
async def run():
    subprocess.run(["ls"])  # expect: subprocess.run @ main.run
    os.system("ls")  # expect: os.system @ main.run
    process = subprocess.Popen(["ls"])
    process.wait()  # expect: subprocess.Popen.wait @ main.run
    return subprocess.check_output(["ls"])  # expect: subprocess.check_output @ main.run


@app.get("/read")
async def read():
    return open("data.txt").read()  # expect: open(...).read @ main.read | severity: medium


@app.get("/read-with")
async def read_with():
    with open("data.txt", "rb") as f:
        return f.read()  # expect: open(...).read @ main.read_with


@app.get("/path")
async def path():
    return (BASE / "data.txt").read_text()  # expect: pathlib.Path.read_text @ main.path


@app.get("/bytes")
async def read_bytes():
    return Path("data.bin").resolve().read_bytes()  # expect: pathlib.Path.read_bytes @ main.read_bytes


@app.post("/copy")
async def copy():
    shutil.copy("a", "b")  # expect: shutil.copy @ main.copy
