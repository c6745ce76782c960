# ruff: noqa
# fmt: off
"""An app built in a factory function: local app, middleware, exception handler, added routes."""

import time

from fastapi import FastAPI, Request

import api


def create_app() -> FastAPI:
    application = FastAPI()

    @application.get("/health")
    async def health():
        time.sleep(0.1)  # expect: time.sleep @ main.create_app.health | routes: GET /health

    @application.middleware("http")
    async def timing(request: Request, call_next):
        time.sleep(0.01)  # expect: time.sleep @ main.create_app.timing | routes: * | kind: middleware
        return await call_next(request)

    @application.exception_handler(ValueError)
    async def on_value_error(request: Request, exc: ValueError):
        time.sleep(0.01)  # expect: time.sleep @ main.create_app.on_value_error | kind: exception_handler

    application.include_router(api.router, prefix="/api")
    application.add_api_route("/added", added, methods=["POST"])
    return application


async def added():
    time.sleep(1)  # expect: time.sleep @ main.added | routes: POST /added


app = create_app()
