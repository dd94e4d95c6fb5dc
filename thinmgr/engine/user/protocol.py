"""The user engine's control channel: JSON lines over the pool server's unix socket.

One request is one line ``{"op": NAME, "args": {...}}``; its answer is one line, either
``{"ok": true, "result": VALUE}`` or ``{"ok": false, "error": {exit_code, class, message,
hint}}``. Errors cross the socket as data and are raised again on the client as the same
``ThinmgrError`` class (so exit codes and hints reach the CLI unchanged); a class the client
does not know becomes the ``thinmgr.errors`` class with the same exit code.

Pure encoding only: sockets live in ``client.py`` and ``server.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from thinmgr import errors
from thinmgr.engine.base import PoolMode, PoolSpec, PoolStatus, VolumeStatus
from thinmgr.errors import InternalError, ThinmgrError

MAX_LINE = 1 << 20  # a request or answer never needs more; a longer line is refused

# The requests the server answers (see server.py for what each does).
OPS = frozenset(
    {
        "ping",
        "activate",
        "deactivate",
        "suspend",
        "resume",
        "create_thin",
        "create_snap",
        "delete",
        "set_transaction_id",
        "reserve_metadata_snap",
        "release_metadata_snap",
        "status",
        "thin_ids",
        "thin_status",
        "volume_status",
        "commit",
        "extend",
        "stop",
    }
)


class ProtocolError(InternalError):
    """A malformed line on the control channel: a bug or a foreign process on the socket."""


def encode_request(op: str, **args: Any) -> bytes:
    if op not in OPS:
        raise ProtocolError(f"unknown control request {op!r}")
    return _line({"op": op, "args": args})


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    message = _parse(line)
    op, args = message.get("op"), message.get("args", {})
    if not isinstance(op, str) or op not in OPS or not isinstance(args, dict):
        raise ProtocolError(f"malformed control request: {line[:200]!r}")
    return op, args


def encode_result(result: Any) -> bytes:
    return _line({"ok": True, "result": result})


def encode_error(error: ThinmgrError) -> bytes:
    return _line({"ok": False, "error": error_to_dict(error)})


def decode_response(line: bytes) -> Any:
    """The result of a response line; an error response is raised as its ThinmgrError."""
    message = _parse(line)
    if message.get("ok") is True:
        return message.get("result")
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, dict):
        raise error_from_dict(error)
    raise ProtocolError(f"malformed control response: {line[:200]!r}")


def error_to_dict(error: ThinmgrError) -> dict[str, Any]:
    return {
        "exit_code": int(error.exit_code),
        "class": type(error).__name__,
        "message": error.message,
        "hint": error.hint,
    }


def error_from_dict(data: Mapping[str, Any]) -> ThinmgrError:
    message = str(data.get("message", "the pool server failed"))
    hint = data.get("hint")
    hint = None if hint is None else str(hint)
    known = _error_classes()
    cls = known.get(str(data.get("class", "")))
    if cls is None:
        cls = _class_for_exit_code(int(data.get("exit_code", errors.ExitCode.INTERNAL)))
    return cls(message, hint=hint)


def _error_classes() -> dict[str, type[ThinmgrError]]:
    found: dict[str, type[ThinmgrError]] = {}
    pending: list[type[ThinmgrError]] = [ThinmgrError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def _class_for_exit_code(code: int) -> type[ThinmgrError]:
    for value in vars(errors).values():
        if (
            isinstance(value, type)
            and issubclass(value, ThinmgrError)
            and value.__module__ == errors.__name__
            and value.exit_code == code
        ):
            return value
    return InternalError


# -- values that cross the socket ------------------------------------------------------------


def spec_to_dict(spec: PoolSpec) -> dict[str, Any]:
    return {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def spec_from_dict(data: Mapping[str, Any]) -> PoolSpec:
    from thinmgr.engine.base import NoSpacePolicy

    return PoolSpec(
        name=str(data["name"]),
        metadata=Path(data["metadata"]),
        data=Path(data["data"]),
        run_dir=Path(data["run_dir"]),
        data_block_sectors=int(data["data_block_sectors"]),
        low_water_mark=int(data["low_water_mark"]),
        no_space=NoSpacePolicy(data["no_space"]),
    )


def pool_status_to_dict(status: PoolStatus) -> dict[str, Any]:
    return {f.name: _plain(getattr(status, f.name)) for f in dataclasses.fields(status)}


def pool_status_from_dict(data: Mapping[str, Any]) -> PoolStatus:
    values = dict(data)
    values["mode"] = PoolMode(values["mode"])
    return PoolStatus(**values)


def volume_status_to_dict(status: VolumeStatus) -> dict[str, Any]:
    return {f.name: _plain(getattr(status, f.name)) for f in dataclasses.fields(status)}


def volume_status_from_dict(data: Mapping[str, Any]) -> VolumeStatus:
    values = dict(data)
    values["device"] = None if values["device"] is None else Path(values["device"])
    return VolumeStatus(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    raise ProtocolError(f"cannot send a {type(value).__name__} over the control channel")


def _line(message: Mapping[str, Any]) -> bytes:
    line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"control message of {len(line)} bytes is over the limit")
    return line


def _parse(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"control line of {len(line)} bytes is over the limit")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"control line is not JSON: {line[:200]!r}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"control line is not a JSON object: {line[:200]!r}")
    return message
