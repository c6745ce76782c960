"""Gateway: calls the orders app over HTTP with httpx (one request, one trace across both apps).

``ORDERS_URL`` is where to reach it (the router), ``ORDERS_HOST`` the Host it is routed by.
"""

import os

import httpx
from fastapi import FastAPI

app = FastAPI()


@app.get("/checkout/{order_id}")
async def checkout(order_id: int) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=os.environ["ORDERS_URL"], timeout=10) as client:
        response = await client.get(f"/orders/{order_id}", headers={"Host": os.environ["ORDERS_HOST"]})
    return {"order": response.json(), "orders_status": response.status_code}


@app.get("/boom")
async def boom() -> None:
    raise RuntimeError("the gateway exploded")
