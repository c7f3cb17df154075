"""lmaas: large models as a service, on one Ray cluster."""

__version__ = "0.1.0"
