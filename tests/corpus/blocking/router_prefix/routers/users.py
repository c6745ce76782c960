# ruff: noqa
# fmt: off
import requests
from fastapi import APIRouter

router = APIRouter(prefix="/users")
profile = APIRouter(prefix="/{user_id}/profile")


@profile.put("")
async def update_profile(user_id: int):
    requests.put("https://example.com")  # expect: requests.put @ routers.users.update_profile | routes: PUT /users/{user_id}/profile


router.include_router(profile)
