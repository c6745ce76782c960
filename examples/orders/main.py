"""Orders: a FastAPI app on SQLite through SQLAlchemy (its queries show up as spans of its traces)."""

from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine, text

engine = create_engine("sqlite:///orders.db")


@asynccontextmanager
async def lifespan(app: FastAPI):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL)"))
        conn.execute(text("INSERT OR IGNORE INTO orders (id, item) VALUES (1, 'book'), (2, 'pen')"))
    yield


app = FastAPI(lifespan=lifespan)


@app.get("/orders/{order_id}")
def get_order(order_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT id, item FROM orders WHERE id = :id"), {"id": order_id}).first()
    if row is None:
        raise HTTPException(status_code=404, detail=f"no order {order_id}")
    return {"id": row.id, "item": row.item}
