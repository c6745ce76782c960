"""What blocks an event loop: the known blocking APIs, in the vocabulary of resolved symbols.

The resolver (``_index.py``) turns an expression into a *symbol*, a dotted name in which ``()`` marks
"an instance of": ``requests.get`` is the function, ``requests.Session()`` a session object and
``requests.Session().get`` its method. This module only holds data about those symbols:

* ``CANONICAL``: spellings of the same thing (``sqlmodel.Session`` is ``sqlalchemy.orm.Session``);
* ``RETURNS``: what a call or an attribute gives (``sqlite3.connect()`` is a ``sqlite3.Connection()``);
* ``FUNCTIONS`` and ``METHODS``: the blocking calls, by category;
* ``OFFLOAD``: the calls that run their argument in a worker thread, so nothing inside them is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CANONICAL", "OFFLOAD", "RETURNS", "Rule", "display", "lookup"]


@dataclass(frozen=True)
class Rule:
    """One kind of blocking call: how bad it is and what to do instead."""

    category: str
    """``sleep``, ``http``, ``socket``, ``database``, ``subprocess`` or ``file``."""
    severity: str
    """``high`` (blocks for as long as a remote peer or a timer wants), ``medium`` (local I/O that grows
    with the data) or ``low`` (a smell rather than a stall)."""
    fix: str
    """The async replacement."""
    offload: bool = True
    """Whether running the call in a worker thread is a sensible alternative (not for a sleep)."""


_RULES = {
    "sleep": Rule("sleep", "high", "use `await asyncio.sleep(...)`", offload=False),
    "http": Rule(
        "http", "high", "use `httpx.AsyncClient` (`async with httpx.AsyncClient() as c: await c.get(...)`)"
    ),
    "socket": Rule("socket", "high", "use `asyncio.open_connection(...)`"),
    "database": Rule(
        "database",
        "high",
        "use an async driver (SQLAlchemy `AsyncSession`, `asyncpg` or `psycopg.AsyncConnection`, "
        "`aiosqlite`, `redis.asyncio`)",
    ),
    "subprocess": Rule(
        "subprocess",
        "high",
        "use `await asyncio.create_subprocess_exec(...)` or `await anyio.run_process(...)`",
    ),
    "file": Rule("file", "medium", "use `await anyio.Path(...).read_text()` (or `aiofiles`)"),
}
_CREATE_ENGINE = Rule(
    "database",
    "low",
    "create the engine once at startup (or use `create_async_engine`), not per request",
    offload=False,
)

# The async counterpart of each synchronous driver: the concrete fix for a database finding.
_DRIVERS = {
    "sqlalchemy": "use SQLAlchemy's asyncio API (`create_async_engine`, `AsyncSession`)",
    "sqlite3": "use `aiosqlite` (`async with aiosqlite.connect(...) as db: await db.execute(...)`)",
    "psycopg2": "use `psycopg.AsyncConnection` (psycopg 3) or `asyncpg`",
    "psycopg": "use `await psycopg.AsyncConnection.connect(...)`",
    "pymysql": "use `aiomysql` or `asyncmy`",
    "MySQLdb": "use `aiomysql` or `asyncmy`",
    "mysql": "use `aiomysql` or `asyncmy`",
    "redis": "use `redis.asyncio.Redis` (the same API, awaited)",
}
_HTTP_VERBS = frozenset({"get", "post", "put", "patch", "delete", "head", "options", "request"})

FUNCTIONS: dict[str, str] = {
    "time.sleep": "sleep",
    **{f"requests.{verb}": "http" for verb in _HTTP_VERBS},
    **{f"httpx.{verb}": "http" for verb in _HTTP_VERBS | {"stream"}},
    "urllib.request.urlopen": "http",
    "urllib.request.urlretrieve": "http",
    "urllib3.request": "http",
    "socket.create_connection": "socket",
    "socket.getaddrinfo": "socket",
    "socket.gethostbyname": "socket",
    "socket.gethostbyname_ex": "socket",
    "socket.gethostbyaddr": "socket",
    "socket.getfqdn": "socket",
    "sqlite3.connect": "database",
    "psycopg2.connect": "database",
    "psycopg.connect": "database",
    "pymysql.connect": "database",
    "MySQLdb.connect": "database",
    "mysql.connector.connect": "database",
    "subprocess.run": "subprocess",
    "subprocess.call": "subprocess",
    "subprocess.check_call": "subprocess",
    "subprocess.check_output": "subprocess",
    "subprocess.getoutput": "subprocess",
    "subprocess.getstatusoutput": "subprocess",
    "os.system": "subprocess",
    "os.wait": "subprocess",
    "os.waitpid": "subprocess",
    **{
        f"shutil.{name}": "file"
        for name in (
            "copy",
            "copy2",
            "copyfile",
            "copytree",
            "move",
            "rmtree",
            "make_archive",
            "unpack_archive",
        )
    },
}

_DBAPI_CURSOR = frozenset({"execute", "executemany", "fetchone", "fetchmany", "fetchall", "callproc"})
# An instance type -> (category, its blocking methods; None: every public method but those in _NOT_IO).
METHODS: dict[str, tuple[str, frozenset[str] | None]] = {
    "requests.Session()": ("http", _HTTP_VERBS | {"send"}),
    "httpx.Client()": ("http", _HTTP_VERBS | {"send", "stream"}),
    "http.client.HTTPConnection()": ("http", frozenset({"request", "getresponse", "connect", "endheaders"})),
    "urllib3.PoolManager()": ("http", frozenset({"request", "urlopen"})),
    "urllib.request.OpenerDirector()": ("http", frozenset({"open"})),
    "socket.socket()": (
        "socket",
        frozenset(
            {"connect", "accept", "recv", "recv_into", "recvfrom", "send", "sendall", "sendto", "sendfile"}
        ),
    ),
    "sqlite3.Connection()": (
        "database",
        frozenset({"execute", "executemany", "executescript", "commit", "backup"}),
    ),
    "sqlite3.Cursor()": ("database", _DBAPI_CURSOR | {"executescript"}),
    "psycopg2.Connection()": ("database", frozenset({"commit", "rollback"})),
    "psycopg2.Cursor()": ("database", _DBAPI_CURSOR | {"copy_expert", "copy_from", "copy_to"}),
    "psycopg.Connection()": ("database", frozenset({"execute", "commit", "rollback"})),
    "psycopg.Cursor()": ("database", _DBAPI_CURSOR | {"copy"}),
    "pymysql.Connection()": ("database", frozenset({"commit", "rollback", "ping", "query"})),
    "pymysql.Cursor()": ("database", _DBAPI_CURSOR),
    "redis.Redis()": ("database", None),
    "redis.Pipeline()": ("database", frozenset({"execute"})),
    "sqlalchemy.Engine()": ("database", frozenset({"connect", "begin", "raw_connection"})),
    "sqlalchemy.Connection()": (
        "database",
        frozenset({"execute", "exec_driver_sql", "scalar", "scalars", "commit", "rollback"}),
    ),
    "sqlalchemy.orm.Session()": (
        "database",
        frozenset(
            {"execute", "exec", "scalars", "scalar", "query", "get", "get_one", "commit", "flush", "refresh"}
            | {"merge", "connection"}
        ),
    ),
    "subprocess.Popen()": ("subprocess", frozenset({"wait", "communicate"})),
    "open()": ("file", frozenset({"read", "readlines", "write", "writelines"})),
    "pathlib.Path()": ("file", frozenset({"read_text", "read_bytes", "write_text", "write_bytes"})),
}
# Methods of an "every method blocks" client that do no I/O themselves.
_NOT_IO = frozenset({"pipeline", "pubsub", "lock", "register_script", "client", "get_encoder"})

CANONICAL: dict[str, str] = {
    "sqlmodel.Session": "sqlalchemy.orm.Session",
    "sqlalchemy.orm.session.Session": "sqlalchemy.orm.Session",
    "sqlmodel.create_engine": "sqlalchemy.create_engine",
    "sqlalchemy.engine.create_engine": "sqlalchemy.create_engine",
    "sqlalchemy.engine.Engine": "sqlalchemy.Engine",
    "sqlalchemy.engine.base.Engine": "sqlalchemy.Engine",
    "sqlalchemy.engine.Connection": "sqlalchemy.Connection",
    "sqlalchemy.engine.base.Connection": "sqlalchemy.Connection",
    "sqlalchemy.orm.session.sessionmaker": "sqlalchemy.orm.sessionmaker",
    "sqlalchemy.orm.scoping.scoped_session": "sqlalchemy.orm.scoped_session",
    "requests.api.request": "requests.request",
    **{f"requests.api.{verb}": f"requests.{verb}" for verb in _HTTP_VERBS},
    "requests.sessions.Session": "requests.Session",
    "requests.session": "requests.Session",
    "http.client.HTTPSConnection": "http.client.HTTPConnection",
    "redis.StrictRedis": "redis.Redis",
    "redis.client.Redis": "redis.Redis",
    "redis.client.StrictRedis": "redis.Redis",
    "redis.Redis.from_url": "redis.from_url",
    "redis.client.Pipeline": "redis.Pipeline",
    "psycopg.Connection.connect": "psycopg.connect",
    "psycopg2.extensions.connection": "psycopg2.Connection",
    "psycopg2.extensions.cursor": "psycopg2.Cursor",
    "pymysql.connections.Connection": "pymysql.Connection",
    "pymysql.cursors.Cursor": "pymysql.Cursor",
    "sqlite3.dbapi2.connect": "sqlite3.connect",
    "pathlib.PosixPath": "pathlib.Path",
    "pathlib.WindowsPath": "pathlib.Path",
    "io.open": "open",
    "builtins.open": "open",
    "codecs.open": "open",
    "gzip.open": "open",
    "starlette.concurrency.run_in_threadpool": "fastapi.concurrency.run_in_threadpool",
    "starlette.concurrency.iterate_in_threadpool": "fastapi.concurrency.iterate_in_threadpool",
    "fastapi.applications.FastAPI": "fastapi.FastAPI",
    "fastapi.routing.APIRouter": "fastapi.APIRouter",
    "fastapi.param_functions.Depends": "fastapi.Depends",
    "fastapi.params.Depends": "fastapi.Depends",
    "fastapi.param_functions.Security": "fastapi.Security",
    "fastapi.params.Security": "fastapi.Security",
    "typing_extensions.Annotated": "typing.Annotated",
    "typing_extensions.Optional": "typing.Optional",
}

_PATH_RESULTS = (
    "parent",
    "resolve()",
    "absolute()",
    "with_name()",
    "with_suffix()",
    "with_stem()",
    "joinpath()",
)
RETURNS: dict[str, str] = {
    "urllib.request.build_opener()": "urllib.request.OpenerDirector()",
    "socket.create_connection()": "socket.socket()",
    "sqlite3.connect()": "sqlite3.Connection()",
    "sqlite3.Connection().cursor()": "sqlite3.Cursor()",
    "sqlite3.Connection().execute()": "sqlite3.Cursor()",
    "psycopg2.connect()": "psycopg2.Connection()",
    "psycopg2.Connection().cursor()": "psycopg2.Cursor()",
    "psycopg.connect()": "psycopg.Connection()",
    "psycopg.Connection().cursor()": "psycopg.Cursor()",
    "psycopg.Connection().execute()": "psycopg.Cursor()",
    "pymysql.connect()": "pymysql.Connection()",
    "pymysql.Connection().cursor()": "pymysql.Cursor()",
    "redis.from_url()": "redis.Redis()",
    "redis.Redis().pipeline()": "redis.Pipeline()",
    "sqlalchemy.create_engine()": "sqlalchemy.Engine()",
    "sqlalchemy.Engine().connect()": "sqlalchemy.Connection()",
    "sqlalchemy.Engine().begin()": "sqlalchemy.Connection()",
    "sqlalchemy.orm.sessionmaker()()": "sqlalchemy.orm.Session()",
    "sqlalchemy.orm.scoped_session()": "sqlalchemy.orm.Session()",
    "pathlib.Path().open()": "open()",
    "pathlib.Path.cwd()": "pathlib.Path()",
    "pathlib.Path.home()": "pathlib.Path()",
    **{f"pathlib.Path().{name}": "pathlib.Path()" for name in _PATH_RESULTS},
}

OFFLOAD = frozenset(
    {
        "fastapi.concurrency.run_in_threadpool",
        "fastapi.concurrency.iterate_in_threadpool",
        "asyncio.to_thread",
        "anyio.to_thread.run_sync",
        "anyio.to_process.run_sync",
        "asyncer.asyncify",
        "asyncer.asyncify()",
    }
)


def lookup(symbol: str) -> Rule | None:
    """The rule for calling ``symbol``, or None when the call does not block."""
    if symbol == "sqlalchemy.create_engine":
        return _CREATE_ENGINE
    category = FUNCTIONS.get(symbol)
    if category is not None:
        return _rule(category, symbol)
    owner, _, method = symbol.rpartition(".")
    entry = METHODS.get(owner)
    if entry is None or method.startswith("_"):
        return None
    category, methods = entry
    if (methods is None and method not in _NOT_IO) or (methods is not None and method in methods):
        return _rule(category, symbol)
    return None


def _rule(category: str, symbol: str) -> Rule:
    rule = _RULES[category]
    driver = _DRIVERS.get(symbol.split(".")[0]) if category == "database" else None
    return rule if driver is None else Rule(rule.category, rule.severity, driver)


def display(symbol: str) -> str:
    """How a finding names a symbol: ``sqlite3.Connection().execute`` is ``sqlite3.Connection.execute``."""
    if symbol.startswith("open()."):
        symbol = "open(...)." + symbol[len("open().") :]
    return symbol.replace("().", ".")
