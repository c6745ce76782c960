"""``/internal/routers``: where remote routers (``fastapi-deploy router``) connect (control_plane/routers.py).

A WebSocket, authenticated with ``FASTAPI_DEPLOY_ROUTER_TOKEN`` (``Authorization: Bearer``). Not part of
the public API. Close codes: 1008 a wrong or missing token (or no token configured), 1013 this control
plane does not lead (the router retries, and finds the leader behind the Service).
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from control_plane.platform import Platform

router = APIRouter(include_in_schema=False)


@router.websocket("/internal/routers")
async def remote_router(ws: WebSocket) -> None:
    platform: Platform = ws.app.state.platform
    expected = platform.settings.router_token
    given = ws.headers.get("authorization", "")
    if not expected or not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        await ws.close(code=1008, reason="wrong router token (FASTAPI_DEPLOY_ROUTER_TOKEN)")
        return
    if not platform.deployer.leading:
        await ws.close(code=1013, reason="not the leader")
        return
    await ws.accept()
    try:
        await platform.router.serve(ws, platform.leading)
    except WebSocketDisconnect:
        pass
