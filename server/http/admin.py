"""/v1/adapters: the Adapters admin operations over HTTP (server/adapters/manager.py, as the gRPC service uses it),
behind the same --admin-token."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request

from adapters_store.errors import AdapterError, AdapterNotFound
from server.adapters.errors import InvalidAdminRequest, PathNotAllowed, PinLimit
from server.adapters.manager import AdapterManager, AdapterStatus
from server.http.errors import ApiError, clip
from server.http.schemas import LoadAdapterBody

T = TypeVar("T")


def status_json(status: AdapterStatus) -> dict[str, Any]:
    """One adapter as GetAdapter describes it; enums as lower-case names."""
    error = {"reason": status.error.reason, "message": status.error.message} if status.error else None
    return {
        "name": status.name, "object": "adapter", "state": status.state.name.lower(), "version": status.version,
        "path": status.path, "source": status.source, "pinned": status.pinned, "format": status.format,
        "methods": list(status.methods), "ranks": list(status.ranks), "targets": list(status.targets),
        "parameter_count": status.num_parameters, "bytes": status.nbytes,
        "tier": status.tier.name.lower() if status.tier else None, "loaded_at": status.loaded_at,
        "load_seconds": status.load_seconds, "last_used": status.last_used, "in_flight": status.in_flight,
        "draining_versions": status.draining_versions, "error": error,
    }


def _admin_error(error: Exception) -> ApiError:
    if isinstance(error, AdapterNotFound):
        return ApiError(404, f"adapter {clip(error.name)!r} not found" + (f": {error.detail}" if error.detail else ""),
                        param="name", code="adapter_not_found")
    if isinstance(error, PathNotAllowed):
        return ApiError(403, clip(error, 300), "permission_error", param="path", code="path_not_allowed")
    if isinstance(error, PinLimit):
        return ApiError(409, clip(error, 300), code="pin_limit")
    if isinstance(error, AdapterError):
        return ApiError(400, clip(error, 300), code=error.reason)
    return ApiError(400, clip(error, 300))


async def _call(fn: Callable[..., T], *args: object) -> T:
    try:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except (AdapterNotFound, PathNotAllowed, PinLimit, AdapterError, InvalidAdminRequest) as error:
        raise _admin_error(error) from error


def _require_admin(token: str) -> Callable[[Request], None]:
    expected = f"Bearer {token}".encode()

    def check(request: Request) -> None:
        if not token:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise ApiError(401, "this admin call needs 'Authorization: Bearer <token>' with the server's "
                           "--admin-token", code="invalid_admin_token")
    return check


def router(manager: AdapterManager, admin_token: str) -> APIRouter:
    """GET /v1/adapters (list), GET /v1/adapters/{name}, POST /v1/adapters (load), DELETE /v1/adapters/{name}."""
    routes = APIRouter(prefix="/v1/adapters", dependencies=[Depends(_require_admin(admin_token))])

    @routes.get("")
    async def list_adapters() -> dict[str, Any]:
        statuses = await _call(manager.list)
        return {"object": "list", "data": [status_json(s) for s in statuses]}

    @routes.get("/{name}")
    async def get_adapter(name: str) -> dict[str, Any]:
        return {"adapter": status_json(await _call(manager.get, name))}

    @routes.post("")
    async def load_adapter(body: LoadAdapterBody) -> dict[str, Any]:
        return {"adapter": status_json(await _call(manager.load, body.name, body.path, body.pinned))}

    @routes.delete("/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        return {"adapter": status_json(await _call(manager.unload, name))}

    return routes
