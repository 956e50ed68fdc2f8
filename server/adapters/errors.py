"""Errors of the admin operations; the service maps each to a gRPC status code."""

from __future__ import annotations


class AdminError(Exception):
    """An admin request that cannot be carried out, with a message for the operator."""


class InvalidAdminRequest(AdminError, ValueError):
    """The request itself is wrong, e.g. an empty or malformed name (INVALID_ARGUMENT)."""


class PathNotAllowed(AdminError, PermissionError):
    """LoadAdapter named a directory outside every allowed root (PERMISSION_DENIED)."""


class PinLimit(AdminError):
    """Pinning one more adapter would leave no device slot for the others (RESOURCE_EXHAUSTED)."""
