"""The OpenAPI 3.1 document of the management API."""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "patgate management API", "version": "1"}}
