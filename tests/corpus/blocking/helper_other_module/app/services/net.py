# ruff: noqa
# fmt: off
import requests


def fetch_json(url):
    response = requests.get(url, timeout=5)  # expect: requests.get @ main.weather | chain: main.weather > app.services.net.fetch_json > requests.get
    return response.json()
