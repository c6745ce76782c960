from fastapi import FastAPI

from app.routes import router

app = FastAPI(title="package example")
app.include_router(router)
