"""The web console at `/console`: page shells (Jinja2 templates) and one small script that calls `/api/v1` and `/v1`.

    lmaas models serve-api --port 8080    then open http://127.0.0.1:8080/console
    (on the gateway: http://127.0.0.1:8000/console)

The pages hold no data and need no key: the browser asks for the key once, keeps it in the tab's
`sessionStorage` (never in a URL or a cookie) and sends it as `Authorization: Bearer` on every
call to the same REST and OpenAI routes the CLI uses, so scopes, tenants, quotas and the audit log
hold exactly as they do there. There is no console-only endpoint. The script is plain JavaScript
committed as source (`static/console.js`): no build step, nothing loaded from another origin, and a
Content-Security-Policy that lets the pages run only their own script.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

import lmaas
from lmaas.registry.refs import MAX_VERSION

ROOT = "/console"
HERE = Path(__file__).parent
PAGES = {
    "login": "Log in",
    "models": "Models",
    "model": "Model",
    "version": "Model version",
    "deployments": "Deployments",
    "jobs": "Jobs",
    "playground": "Playground",
    "usage": "Usage and audit",
}
"""Page name -> its title (each page is `templates/<name>.html`)."""
NAV = ("models", "deployments", "jobs", "playground", "usage")
SECURITY_HEADERS = {
    # only this origin's script and styles; the API calls go to the same origin; no framing
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

router = APIRouter(prefix=ROOT, include_in_schema=False)


def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True)


_environment = None


def render(page: str, **context: object) -> HTMLResponse:
    """The HTML shell of `page`, with `context` for its template (names and numbers from the URL, escaped)."""
    global _environment
    if _environment is None:
        _environment = _templates()
    html = _environment.get_template(f"{page}.html").render(
        page=page, title=PAGES[page], root=ROOT, nav=[(name, PAGES[name]) for name in NAV], version=lmaas.__version__, **context
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get("")
@router.get("/")
def index() -> RedirectResponse:
    return RedirectResponse(f"{ROOT}/models", status_code=302)


def _shell(page: str):
    def endpoint() -> HTMLResponse:
        return render(page)

    endpoint.__name__ = f"console_{page}"
    return endpoint


for _page in ("login", "models", "deployments", "jobs", "playground", "usage"):
    router.add_api_route(f"/{_page}", _shell(_page), methods=["GET"])


@router.get("/models/{name}")
def model(name: str) -> HTMLResponse:
    return render("model", name=name)


@router.get("/models/{name}/versions/{version}")
def version(name: str, version: int = PathParam(ge=1, le=MAX_VERSION)) -> HTMLResponse:
    return render("version", name=name, number=version)


def add_console(app: FastAPI) -> None:
    """Serve the console on `app` (the gateway's or the standalone management app) at `/console`."""
    app.include_router(router)
    app.mount(f"{ROOT}/static", StaticFiles(directory=HERE / "static"), name="console-static")
