# ruff: noqa
# fmt: off
import time

from fastapi import APIRouter

router = APIRouter(prefix="/items", tags=["items"])


@router.get("/{item_id}")
async def read_item(item_id: int):
    time.sleep(1)  # expect: time.sleep @ routers.items.read_item | routes: GET /v1/items/{item_id};GET /v2/items/{item_id}
    return {"id": item_id}
