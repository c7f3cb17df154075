"""Thin FastAPI routers: parse a request, call the library, shape the response."""
