"""The web console's server side (`lmaas.serve.console`): page shells, headers, static files, packaging.

What the pages do in a browser is `tests/integration/test_console.py` (headless Chromium against a gateway).
"""

from __future__ import annotations

import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lmaas.serve.console import HERE, NAV, PAGES, add_console

REPO = Path(__file__).resolve().parents[2]
PATHS = {
    "login": "/console/login", "models": "/console/models", "model": "/console/models/tiny",
    "version": "/console/models/tiny/versions/3", "deployments": "/console/deployments", "jobs": "/console/jobs",
    "playground": "/console/playground", "usage": "/console/usage",
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    add_console(app)
    return TestClient(app)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_page_is_a_shell_with_its_script_and_a_strict_policy(client, page):
    response = client.get(PATHS[page])
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert response.headers["cache-control"] == "no-store" and response.headers["referrer-policy"] == "no-referrer"
    html = response.text
    assert f'data-page="{page}"' in html and '<script src="/console/static/console.js" defer></script>' in html
    assert "<script>" not in html and "style=" not in html  # nothing inline: the policy would refuse it
    assert ('aria-label="Console pages"' in html) == (page != "login")


def test_names_from_the_url_are_escaped(client):
    html = client.get('/console/models/%3Cimg%20src%3Dx%20onerror%3D%22alert(1)%22%3E').text
    assert "<img" not in html and 'data-name="&lt;img src=x onerror=&#34;alert(1)&#34;&gt;"' in html


def test_the_root_redirects_to_models_and_static_files_stay_in_their_folder(client):
    assert client.get("/console", follow_redirects=False).headers["location"] == "/console/models"
    assert client.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/console/static/console.css").status_code == 200
    assert client.get("/console/static/../__init__.py").status_code == 404
    assert client.get("/console/static/%2e%2e/__init__.py").status_code == 404


def test_the_console_is_not_part_of_the_api_document(client):
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/console")]


def test_every_console_file_is_package_data():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lmaas"]
    package = HERE.parents[1]  # platform/lmaas
    files = [p.relative_to(package).as_posix() for p in HERE.rglob("*") if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), files
    assert set(NAV) <= set(PAGES) and {p.stem for p in (HERE / "templates").glob("*.html")} == set(PAGES) | {"base"}


def test_the_script_writes_no_html_and_loads_nothing_from_elsewhere():
    script = (HERE / "static" / "console.js").read_text()
    assert not re.search(r"\.(innerHTML|outerHTML)\s*=|insertAdjacentHTML|document\.write|\beval\(|new Function", script)
    for path in [*(HERE / "static").iterdir(), *(HERE / "templates").iterdir()]:
        text = path.read_text()
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), path  # no CDN, no other origin
        assert "localStorage" not in text, path  # the key lives in sessionStorage only
