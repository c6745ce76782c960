# ruff: noqa
# fmt: off
import sqlite3

import requests


class WeatherService:
    def __init__(self):
        self.session = requests.Session()

    def forecast(self):
        return self._get("/forecast")

    def _get(self, path):
        return self.session.get("https://example.com" + path)  # expect: requests.Session.get @ main.weather | chain: main.weather > services.WeatherService.forecast > services.WeatherService._get > requests.Session.get


class Repo:
    def __init__(self):
        self.conn = sqlite3.connect("app.db")  # a class dependency is called in the threadpool

    def load(self):
        return self.conn.execute("select 1").fetchall()  # expect: sqlite3.Connection.execute @ main.repo # expect: sqlite3.Cursor.fetchall @ main.repo


class ApiClient(requests.Session):
    def fetch(self):
        return self.get("https://example.com")  # expect: requests.Session.get @ main.client
