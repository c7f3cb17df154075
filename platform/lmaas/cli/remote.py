"""The CLI against a remote gateway: with `LMAAS_URL` set, read commands ask its REST API instead of the local registry.

    export LMAAS_URL=https://lmaas.example.com LMAAS_API_KEY=lmaas_...
    lmaas models list                  # GET /api/v1/models
    lmaas models show tiny@production  # GET /api/v1/resolve?ref=tiny@production
    lmaas deployments                  # GET /api/v1/deployments

Every call sends `Authorization: Bearer $LMAAS_API_KEY`; a refused key, a missing scope or an
unreachable gateway is one line naming what to do, raised as the matching `LmaasError`.
"""

from __future__ import annotations

import os
from typing import Any

from lmaas.errors import (
    AuthenticationError,
    ConfigError,
    InvalidInputError,
    LmaasError,
    NotFoundError,
    PermissionDeniedError,
    UnreachableError,
)

URL_ENV = "LMAAS_URL"
KEY_ENV = "LMAAS_API_KEY"
TIMEOUT_S = 30.0

_ERRORS: dict[int, type[LmaasError]] = {
    400: InvalidInputError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
}


def gateway_url() -> str | None:
    """The remote gateway's base URL (`LMAAS_URL`, without a trailing slash), or None to use the local registry."""
    url = os.environ.get(URL_ENV, "").strip().rstrip("/")
    return url or None


def get(path: str, params: dict[str, Any] | None = None) -> Any:
    """GET `path` (`/api/v1/...`) on the gateway at `LMAAS_URL` with `LMAAS_API_KEY`; returns the JSON body.

    Raises:
        ConfigError: `LMAAS_URL` is not an http(s) URL, or `LMAAS_API_KEY` is not set.
        AuthenticationError, PermissionDeniedError, NotFoundError, ...: the gateway's error, as one line.
        UnreachableError: the gateway does not answer.
    """
    import httpx

    url = gateway_url()
    if url is None or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{URL_ENV} must be the gateway's http(s) URL, e.g. https://lmaas.example.com, not {url!r}", param=URL_ENV)
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"{URL_ENV} is set, so {KEY_ENV} must be too: an API key of that gateway (`lmaas keys create` there)", param=KEY_ENV)
    try:
        response = httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        reason = "connection refused" if isinstance(exc, httpx.ConnectError) else f"{type(exc).__name__}: {exc}"
        raise UnreachableError(f"cannot reach the gateway at {url} ({URL_ENV}): {reason}") from None
    if response.status_code < 400:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    if response.status_code == 401:
        message = f"{KEY_ENV} was refused by {url}: {message}"
    error = _ERRORS.get(response.status_code, LmaasError)(f"{message} (HTTP {response.status_code} from {url})")
    raise error
