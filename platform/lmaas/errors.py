"""The project's exceptions.

Every user mistake or unreachable dependency raises a subclass of `LmaasError` whose message
says what went wrong and what to do. The CLI prints it as one line; HTTP maps it to an
OpenAI-style JSON error (`status` and `type` below) in one place.
"""

from __future__ import annotations


class LmaasError(Exception):
    """Base class: a failure a user can act on, with a one-line message."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None
    """The error body's `code` (None: derived from the class name, `NotFoundError` -> `not_found`)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(LmaasError):
    """A setting is malformed (bad URI, bad URL, unknown scheme)."""

    status = 400
    type = "invalid_request_error"


class InvalidInputError(LmaasError):
    """Bad user input (a name, a file, a request field); `param` names what was wrong."""

    status = 400
    type = "invalid_request_error"


class UnreachableError(LmaasError):
    """A configured service (artifact store, database, Ray cluster) cannot be reached."""

    status = 503
    type = "service_unavailable"


class ReplicaLostError(UnreachableError):
    """The model replica answering a request died (its process or node went away) before it finished.

    The gateway retries a request on another replica while nothing of it has reached the client
    (see `lmaas.serve.replica.DeploymentEngine`); a stream already under way ends with this error.
    """


class AuthenticationError(LmaasError):
    """No API key, or one that is malformed, unknown, expired or revoked (401, as OpenAI answers)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDeniedError(LmaasError):
    """A valid API key without the scope an action needs."""

    status = 403
    type = "permission_error"
    code = "insufficient_scope"


class RateLimitError(LmaasError):
    """A quota or rate limit is exhausted; `retry_after` is how many seconds until the window resets."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after = max(1, int(retry_after))


class NotFoundError(LmaasError):
    """A named thing (artifact, model, version, dataset) does not exist."""

    status = 404
    type = "not_found_error"


class AlreadyExistsError(LmaasError):
    """An immutable thing already exists and would be overwritten."""

    status = 409
    type = "conflict_error"


class PayloadTooLargeError(LmaasError):
    """An upload past a size limit: a file's maximum, or the room left in its tenant's storage quota."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class IntegrityError(LmaasError):
    """Stored bytes do not match their recorded sha256 (tampered or truncated)."""

    status = 500
    type = "integrity_error"


class JobFailedError(LmaasError):
    """A cluster job (training, compression) failed after its retries; the message says why."""

    status = 500
    type = "job_failed"
