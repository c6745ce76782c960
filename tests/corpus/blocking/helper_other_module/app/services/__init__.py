# ruff: noqa
# fmt: off
from .net import fetch_json

__all__ = ["fetch_json"]
