# ruff: noqa
# fmt: off
from fastapi import APIRouter

from .storage import save

router = APIRouter(prefix="/items")


@router.post("/")
async def save_item(item: str):
    save(item)
