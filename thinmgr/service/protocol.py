"""What the thin client and the command service say to each other. Standard library only:
the client imports this before anything else, on every command.

The client connects to ``HOME/service.sock`` and sends one request: a 4-byte big-endian
length and a JSON object (``argv``, ``env``, ``umask``), with its standard input, output,
error and working directory passed as descriptors (SCM_RIGHTS) -- so the worker reads and
writes the client's own terminal, pipes and files, and resolves relative paths where the
client stands. The service answers with JSON lines: ``{"pid": N}`` once the worker is forked
(the client forwards its signals there), then ``{"exit": CODE}`` when it has ended; or
``{"refused": REASON}``, and the client runs the command itself.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

SOCKET_NAME = "service.sock"
PID_NAME = "service.pid"
LOG_NAME = "service.log"
DEFAULT_HOME = "/var/lib/thinmgr"
HOME_ENV = "THINMGR_HOME"
# Standard input, output and error, then the working directory.
PASSED_FDS = 4
HEADER = struct.Struct(">I")
MAX_REQUEST = 1 << 20  # argv and environment; far above ARG_MAX's usual 128 KiB of env


# Options of the root callback that take a value (the word after them is not a command).
ROOT_VALUE_OPTIONS = ("--home",)


def command_word(args: list[str]) -> str | None:
    """The top-level command of a command line (``pool`` in ``--home X pool list``), if any."""
    words = iter(args)
    for arg in words:
        if arg in ROOT_VALUE_OPTIONS:
            next(words, None)
        elif not arg.startswith("-"):
            return arg
    return None


def home_of(args: list[str], environ: Mapping[str, str]) -> str:
    """The state directory a command line uses: ``--home``, else THINMGR_HOME, else the
    default (the root callback's order, cli/app.py)."""
    words = iter(args)
    for arg in words:
        if arg == "--home":
            value = next(words, None)
            if value:
                return value
        elif arg.startswith("--home="):
            return arg.partition("=")[2]
        elif not arg.startswith("-"):
            break  # the command word: later --home belong to no root option
    return environ.get(HOME_ENV) or DEFAULT_HOME


def socket_path(home: str) -> str:
    return os.path.join(home, SOCKET_NAME)


def encode_request(argv: list[str], env: dict[str, str], umask: int) -> bytes:
    body = json.dumps({"argv": argv, "env": env, "umask": umask}).encode()
    return HEADER.pack(len(body)) + body


def encode_reply(**fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"
