# ruff: noqa
# fmt: off
import requests
from fastapi import APIRouter

router = APIRouter()


@router.get("/ping")
async def ping():
    requests.get("https://example.com")  # expect: requests.get @ api.ping | routes: GET /api/ping
