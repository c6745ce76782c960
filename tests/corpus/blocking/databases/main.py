# ruff: noqa
# fmt: off
"""Synchronous database drivers and clients in async endpoints; the async ones are fine."""

import sqlite3

import psycopg
import redis
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import redis.asyncio as aioredis

engine = create_engine("sqlite://")
SessionLocal = sessionmaker(bind=engine)
cache = redis.Redis()
async_cache = aioredis.Redis()
async_engine = create_async_engine("sqlite+aiosqlite://")
conn = sqlite3.connect(":memory:", check_same_thread=False)

app = FastAPI()


def get_db():
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


@app.get("/users")
async def users(db: Session = Depends(get_db)):
    return db.query(object).all()  # expect: sqlalchemy.orm.Session.query @ main.users


@app.get("/count")
async def count():
    with engine.connect() as connection:  # expect: sqlalchemy.Engine.connect @ main.count
        return connection.execute(text("select 1")).scalar()  # expect: sqlalchemy.Connection.execute @ main.count


@app.get("/cache")
async def cached():
    return cache.get("key")  # expect: redis.Redis.get @ main.cached


@app.get("/pipeline")
async def pipeline():
    pipe = cache.pipeline()
    pipe.set("a", 1)
    pipe.execute()  # expect: redis.Pipeline.execute @ main.pipeline


@app.get("/sqlite")
async def lite():
    cursor = conn.execute("select 1")  # expect: sqlite3.Connection.execute @ main.lite
    return cursor.fetchall()  # expect: sqlite3.Cursor.fetchall @ main.lite


@app.get("/pg")
async def pg():
    with psycopg.connect("dbname=app") as pgconn:  # expect: psycopg.connect @ main.pg
        pgconn.execute("select 1")  # expect: psycopg.Connection.execute @ main.pg


@app.get("/engine")
async def per_request_engine():
    return create_engine("sqlite://")  # expect: sqlalchemy.create_engine @ main.per_request_engine | severity: low


@app.get("/session")
async def session():
    with Session(engine) as s:
        s.commit()  # expect: sqlalchemy.orm.Session.commit @ main.session


@app.get("/async-db")
async def async_db():
    async with AsyncSession(async_engine) as s:
        await s.execute(text("select 1"))
    return await async_cache.get("key")
