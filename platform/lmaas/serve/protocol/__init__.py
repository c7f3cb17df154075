"""Pydantic request and response schemas of lmaas's HTTP APIs."""
