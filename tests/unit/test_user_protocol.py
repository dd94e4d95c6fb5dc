"""The user engine's control channel: request/response round trips and error transport."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinmgr.engine.base import NoSpacePolicy, PoolMode, PoolSpec, PoolStatus, VolumeStatus
from thinmgr.engine.user import protocol
from thinmgr.errors import (
    BusyError,
    ConflictError,
    CorruptMetadataError,
    ExitCode,
    InternalError,
    NoSpaceError,
    NotFoundError,
    ThinmgrError,
)


def test_request_round_trip() -> None:
    line = protocol.encode_request("create_snap", dev=7, origin=3)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.decode_request(line) == ("create_snap", {"dev": 7, "origin": 3})


def test_result_round_trip() -> None:
    assert protocol.decode_response(protocol.encode_result([1, None])) == [1, None]
    assert protocol.decode_response(protocol.encode_result(None)) is None


@pytest.mark.parametrize(
    "error",
    [
        BusyError("device busy", hint="unmount it"),
        NoSpaceError("pool full"),
        ConflictError("transaction id is 4, not 3"),
        NotFoundError("no thin device 9"),
        CorruptMetadataError("bad checksum", block=12, structure="mapping tree"),
        InternalError("boom"),
    ],
)
def test_errors_come_back_as_the_same_class(error: ThinmgrError) -> None:
    with pytest.raises(type(error)) as caught:
        protocol.decode_response(protocol.encode_error(error))
    assert type(caught.value) is type(error)
    assert caught.value.exit_code == error.exit_code
    assert caught.value.message == error.message
    assert caught.value.hint == error.hint


def test_unknown_error_class_falls_back_to_its_exit_code() -> None:
    data = {"exit_code": int(ExitCode.BUSY), "class": "FancyBusy", "message": "m", "hint": "h"}
    error = protocol.error_from_dict(data)
    assert isinstance(error, BusyError) and error.hint == "h"
    unknown = protocol.error_from_dict({"exit_code": 99, "class": "Nope", "message": "x"})
    assert isinstance(unknown, InternalError)


@pytest.mark.parametrize(
    "line",
    [b"not json\n", b"[1,2]\n", b'{"op":"format_disk","args":{}}\n', b'{"op":"stop","args":3}\n'],
)
def test_malformed_requests_are_refused(line: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_request(line)


def test_malformed_response_and_oversized_lines() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_response(b'{"ok":"maybe"}\n')
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_response(b" " * (protocol.MAX_LINE + 1))
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_request("no_such_op")


def test_value_types_round_trip() -> None:
    spec = PoolSpec("p", Path("/m"), Path("/d"), Path("/run/p"), 256, 10, NoSpacePolicy.QUEUE)
    assert protocol.spec_from_dict(protocol.spec_to_dict(spec)) == spec
    status = PoolStatus(5, 128, 10, 100, 20, 2048, None, PoolMode.OUT_OF_DATA_SPACE, False, True)
    wire = protocol.decode_response(protocol.encode_result(protocol.pool_status_to_dict(status)))
    assert protocol.pool_status_from_dict(wire) == status
    volume = VolumeStatus(3, 10, 9, True, Path("/dev/loop3"), 1)
    wire = protocol.decode_response(protocol.encode_result(protocol.volume_status_to_dict(volume)))
    assert protocol.volume_status_from_dict(wire) == volume
