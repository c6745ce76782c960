import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()


@app.get("/")
def root() -> dict[str, str]:
    return {"stream": "/events"}


@app.get("/events")
async def events(count: int = 5, delay: float = 0.2) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        for i in range(count):
            yield f"data: tick {i}\n\n"
            await asyncio.sleep(delay)

    return StreamingResponse(gen(), media_type="text/event-stream")
