# ruff: noqa
# fmt: off
import sqlite3


def _connect():
    return sqlite3.connect("app.db")  # expect: sqlite3.connect @ main.count # expect: sqlite3.connect @ app.routes.save_item


def count_rows():
    return _connect().execute("select count(*) from items").fetchone()  # expect: sqlite3.Connection.execute @ main.count # expect: sqlite3.Cursor.fetchone @ main.count


def save(item):
    with _connect() as conn:
        conn.execute("insert into items values (?)", (item,))  # expect: sqlite3.Connection.execute @ app.routes.save_item
