from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

state: dict[str, object] = {}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Runs before the instance is routed to: the platform waits for it.
    state["model"] = "loaded"
    print("lifespan: startup complete", flush=True)
    yield
    print("lifespan: shutdown", flush=True)


app = FastAPI(lifespan=lifespan)


@app.get("/")
def root() -> dict[str, object]:
    return {"model": state.get("model")}
