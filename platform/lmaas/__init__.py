"""lmaas: large models as a service, on one Ray cluster."""

__version__ = "0.1.0"


def _apply_secrets() -> None:
    """A Ray worker started with `Settings.worker_env` gets its credentials before any of lmaas opens a store."""
    import os

    if os.environ.get("LMAAS_SECRETS_FILE"):
        from lmaas.config import apply_secrets_file

        try:
            apply_secrets_file()
        except Exception:  # noqa: BLE001 - load_settings raises the same error where it matters, as one line
            pass


_apply_secrets()
