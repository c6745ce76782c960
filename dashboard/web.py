"""The plumbing every page shares: the dashboard's state, who is visiting, CSRF, rendering, errors.

    DashboardRoute   every dashboard route: API errors become HTML pages (401: to the login page),
                     security headers on every answer, mutating calls written to the audit log
    visitor()        the session's user, their teams and roles (401 without a valid session)
    posted()         a POST's form, after its CSRF token and Origin are checked (403 otherwise)
    render()         a template with the visitor, the CSRF token and the asset URLs

Access is decided where the API decides it: pages load apps and teams with ``security.get_app`` /
``get_team`` and the same :class:`~control_plane.permissions.Action` as the matching endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select
from starlette.datastructures import FormData

from control_plane import audit
from control_plane.errors import APIError, BadRequest, Forbidden, NotFound, Unauthorized
from control_plane.models import App, AuditEntry, Membership, Team, User
from control_plane.permissions import PERMISSIONS, Action, Role, Rule, allows
from control_plane.platform import Platform
from control_plane.security import Principal, get_app
from dashboard import format as fmt
from dashboard import sessions
from dashboard.assets import Assets

log = logging.getLogger("fastapi_deploy.dashboard")

TEMPLATES = Path(__file__).parent / "templates"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Nothing but our own origin: no inline script, no inline style attributes, no frames, no plugins.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class Dashboard:
    """What the pages share, one per control-plane app: templates, assets and the session keys."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.assets = Assets()
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        env = self.templates.env
        env.auto_reload = False  # templates ship with the package: no stat() per render
        env.globals["asset"] = self.assets.url
        env.globals["sparkline"] = fmt.sparkline
        env.globals["budget_bar"] = fmt.budget_bar
        env.filters.update(fmt.FILTERS)
        self._keys: sessions.Keys | None = None
        self._lock = threading.Lock()

    def keys(self) -> sessions.Keys:
        """The session keys (read from the database once; call from a worker thread)."""
        with self._lock:
            if self._keys is None:
                self._keys = sessions.load_keys(self.platform.db)
            return self._keys


def get_dashboard(request: Request) -> Dashboard:
    """The app's :class:`Dashboard` (``dashboard.routes.mount`` made it with the app)."""
    dash: Dashboard = request.app.state.dashboard
    return dash


DashDep = Annotated[Dashboard, Depends(get_dashboard)]


# -- who is visiting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamChoice:
    id: str
    slug: str
    name: str
    role: Role | None
    """The visitor's own role (None: a platform admin who is not a member)."""


@dataclass
class Visitor:
    """The signed-in user, as the pages need them: their principal, CSRF token and teams."""

    principal: Principal
    user: User
    csrf: str
    teams: list[TeamChoice] = field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return self.user.is_admin

    def role(self, team_id: str) -> Role | None:
        """As ``security.role_in``: platform admins count as owners."""
        if self.user.is_admin:
            return Role.owner
        return next((t.role for t in self.teams if t.id == team_id), None)

    def can(self, action: Action | str, team_id: str) -> bool:
        """Whether the visitor may perform ``action`` in the team (the API would allow it)."""
        role = self.role(team_id)
        return role is not None and allows(role, Action(action))

    def rule(self, action: Action | str) -> Rule:
        """What ``action`` is and the role it needs (for "your role cannot ..." notes)."""
        return PERMISSIONS[Action(action)]


def cookie_name(request: Request, platform: Platform) -> str:
    """``__Host-`` over HTTPS: the browser then refuses the cookie from any other host (an app on a
    sibling subdomain cannot plant or overwrite it)."""
    return "__Host-fdp_session" if is_secure(request, platform) else "fdp_session"


def is_secure(request: Request, platform: Platform) -> bool:
    return request.url.scheme == "https" or platform.settings.api_url.startswith("https://")


def _teams(session: Session, user: User) -> list[TeamChoice]:
    roles = {
        m.team_id: Role.parse(m.role)
        for m in session.exec(select(Membership).where(Membership.user_id == user.id)).all()
    }
    query = select(Team).order_by(col(Team.slug))
    if not user.is_admin:
        query = query.where(col(Team.id).in_(list(roles)))
    return [TeamChoice(t.id, t.slug, t.name, roles.get(t.id)) for t in session.exec(query).all()]


def visitor(request: Request, dash: DashDep) -> Visitor:
    """The session's visitor; :class:`Unauthorized` (→ the login page) without a valid session."""
    keys = dash.keys()
    platform = dash.platform
    with platform.db.session() as s:
        principal = sessions.resolve(s, keys, request.cookies.get(cookie_name(request, platform)))
        assert principal.user is not None  # sessions.resolve guarantees it
        teams = _teams(s, principal.user)
    audit.note(request, principal=principal)
    found = Visitor(principal, principal.user, sessions.csrf_token(keys, principal.token.id), teams)
    request.state.visitor = found
    return found


VisitorDep = Annotated[Visitor, Depends(visitor)]


def same_origin(request: Request, platform: Platform) -> bool:
    """A browser's POST names its origin; it must be ours (the request's own host, or the public URL).
    Clients that send no Origin are not browsers: the CSRF token alone decides."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    public = urlsplit(platform.settings.api_url)
    return origin in (f"{request.url.scheme}://{host}", f"{public.scheme}://{public.netloc}")


async def posted(request: Request, who: VisitorDep, dash: DashDep) -> FormData:
    """The POST's form, once its CSRF token (form field or ``X-CSRF-Token``) and Origin are checked."""
    form = await request.form()
    given = form.get(CSRF_FIELD)
    token = given if isinstance(given, str) else request.headers.get(CSRF_HEADER)
    keys = await asyncio.to_thread(dash.keys)
    if not same_origin(request, dash.platform) or not sessions.check_csrf(
        keys, who.principal.token.id, token
    ):
        raise Forbidden(
            "The form could not be verified (it may be from another site, or from an older session).",
            title="Form expired",
            hint="Go back, reload the page and send the form again.",
            code="csrf_failed",
        )
    return form


FormDep = Annotated[FormData, Depends(posted)]


def field_str(form: FormData, name: str, default: str = "") -> str:
    """A text field of the form, stripped (``default`` when absent)."""
    value = form.get(name)
    return value.strip() if isinstance(value, str) else default


def messages(exc: ValidationError) -> dict[str, str]:
    """A request model's validation errors by form field (the first of each), in words."""
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        name = loc[0] if loc else "form"
        if name == "upsert":  # EnvBatch: {"upsert": {NAME: {"value": ...}}}
            name = "name" if len(loc) < 3 else "value"
        out.setdefault(name, str(err["msg"]).removeprefix("Value error, "))
    return out


# -- loading what a page shows ----------------------------------------------------------------------------


def app_by_slug(session: Session, who: Visitor, slug: str, action: Action) -> App:
    """The app named ``slug`` if the visitor may perform ``action`` on it: exactly ``get_app``'s
    answers (404 for another team's app, 403 for a role too low)."""
    row = session.exec(select(App).where(App.slug == slug)).first()
    if row is None:
        raise NotFound(f"App {slug} not found.", title="App not found", hint="The apps page lists yours.")
    return get_app(session, who.principal, row.id, action=action)


async def load_app(platform: Platform, who: Visitor, slug: str, action: Action) -> App:
    """:func:`app_by_slug` in a worker thread, for a form's handler: the API's 404/403 come before any
    validation of what was typed (the API's handler checks again, as it always does)."""

    def load() -> App:
        with platform.db.session() as s:
            return app_by_slug(s, who, slug, action)

    return await asyncio.to_thread(load)


# -- answering ----------------------------------------------------------------------------------------------


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """``name`` rendered with the visitor (when signed in), CSRF token, settings and ``context``."""
    dash = get_dashboard(request)
    who: Visitor | None = getattr(request.state, "visitor", None)
    ctx = {
        "v": who,
        "csrf": who.csrf if who else "",
        "csrf_field": CSRF_FIELD,
        "settings": dash.platform.settings,
        "Action": Action,
        **context,
    }
    response: HTMLResponse = dash.templates.TemplateResponse(request, name, ctx, status_code=status)
    return response


def see_other(url: str) -> RedirectResponse:
    """After a POST: the browser GETs ``url`` (so a reload does not post again)."""
    return RedirectResponse(url, status_code=303)


def safe_next(value: str | None) -> str:
    """A post-login destination: only a path of the dashboard (never another site)."""
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard/"


def _wants_json(request: Request) -> bool:
    return request.url.path.endswith((".json", ".ndjson"))


def error_response(request: Request, exc: APIError) -> Response:
    """An API error as the dashboard shows it: JSON for the pages' own data endpoints, a redirect to
    the login page for 401, else an HTML page with the error's title, message and hint."""
    if _wants_json(request):
        return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)
    if isinstance(exc, Unauthorized):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = request.headers.get("referer", "/dashboard/")
            target = urlsplit(target).path or "/dashboard/"
        return see_other(f"/dashboard/login?next={quote(safe_next(target))}")
    response = render(request, "error.html", exc.status_code, error=exc)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


def _record(db: Any, request: Request, route: str, status: int, started: float) -> None:
    """The audit entry of a dashboard call, as ``control_plane/audit.py`` writes the API's."""
    info: dict[str, Any] = request.scope.get("state", {}).get("audit", {})
    entry = AuditEntry(
        method=request.method,
        path=request.url.path[:2000],
        route=route,
        status_code=status,
        actor_kind=info.get("kind"),
        actor_user_id=info.get("user_id"),
        actor_email=info.get("email"),
        actor_token_id=info.get("token_id"),
        team_id=info.get("team_id"),
        app_id=info.get("app_id"),
        client_ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent", "")[:300],
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )
    try:
        with db.session() as s:
            s.add(entry)
            s.commit()
    except SQLAlchemyError:
        log.exception("could not write the audit entry for %s %s", entry.method, entry.path)


class DashboardRoute(APIRoute):
    """Every dashboard route: errors as pages, security headers, audit entries for mutating calls.

    The audit middleware records ``/api/v1`` only; the dashboard's own forms change the same things,
    so they are recorded here, with the same fields (``route`` is the dashboard's path template)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        template = self.path_format

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except APIError as exc:
                response = error_response(request, exc)
            except RequestValidationError:
                response = error_response(
                    request, BadRequest("The request's parameters are not valid.", title="Bad request")
                )
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            response.headers.setdefault("Cache-Control", "no-store")
            if request.method in MUTATING:
                platform: Platform = request.app.state.platform
                await asyncio.to_thread(
                    _record, platform.db, request, template, response.status_code, started
                )
            return response

        return run
