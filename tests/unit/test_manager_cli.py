"""Every manager command through the CLI (``thinmgr.cli.app.run``) on the fake engine.

The same tests can run on the real user engine (root tier) by pointing
THINMGR_ENGINE_FACTORY at it; here the fake engine keeps them fast and root-free.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import fake_engine
from thinmgr.cli.app import run
from thinmgr.errors import ExitCode
from thinmgr.ops.pools import metadata_size_for

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("THINMGR_ENGINE_FACTORY", fake_engine.FACTORY)
    monkeypatch.setenv("THINMGR_LOCK_WAIT", "2")
    monkeypatch.setattr("thinmgr.ops.journal.BUSY_RETRY_DELAYS", (0.0, 0.0))
    fake_engine.CRASH.arm(None)
    return tmp_path / "home"


@pytest.fixture
def cli(home: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = run(["--home", str(home), *args])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def js(cli: Cli, *args: str) -> Any:
    code, out, err = cli("--json", *args)
    assert code == 0, err
    return json.loads(out)


def run_dir(home: Path, pool: str) -> Path:
    return home / "run" / pool


def test_pool_lifecycle(cli: Cli, home: Path) -> None:
    info = js(cli, "pool", "create", "p", "--size", "1G", "--block-size", "128K")
    assert info["name"] == "p" and info["block_size"] == 128 << 10 and info["file_backed"]
    data = home / "pools" / "p" / "data"
    assert data.stat().st_size == 1 << 30 and data.stat().st_blocks == 0  # sparse
    # metadata by the kernel's rule (48 B per block x2 headroom) plus room for 4096 devices
    assert (home / "pools" / "p" / "metadata").stat().st_size == metadata_size_for(
        (1 << 30) // (128 << 10)
    )
    assert [p["name"] for p in js(cli, "pool", "list")] == ["p"]
    status = js(cli, "pool", "status", "p")
    assert status["total_data_blocks"] == 8192 and status["data_used_percent"] == 0.0
    assert status["transaction_id"] == 0 and status["mode"] == "rw" and status["warnings"] == []
    code, out, _ = cli("pool", "status", "p")
    assert code == 0 and "transaction id" in out
    assert js(cli, "pool", "extend", "p", "--size", "2G")["total_data_blocks"] == 16384
    assert data.stat().st_size == 2 << 30
    code, _, err = cli("pool", "extend", "p", "--size", "1G")
    assert code == ExitCode.USAGE and "only grow" in err
    assert cli("pool", "deactivate", "p")[0] == 0
    assert js(cli, "pool", "status", "p")["active"] is False
    assert cli("pool", "activate", "p")[0] == 0
    assert cli("pool", "check", "p")[0] == 0
    code, out, _ = cli("pool", "dump", "p")
    assert code == 0 and out.startswith("<superblock") and 'nr_data_blocks="16384"' in out
    assert cli("pool", "destroy", "p")[0] == 0
    assert not (home / "pools" / "p").exists() and js(cli, "pool", "list") == []


def test_volumes_and_snapshots(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "1G")
    v = js(cli, "volume", "create", "p", "v", "--size", "100001")  # rounds up to 64 KiB
    assert v["size"] == 2 * 65536 and v["dev_id"] == 0 and v["state"] == "inactive"
    code, _, err = cli("volume", "create", "p", "v", "--size", "1G")
    assert code == ExitCode.CONFLICT and "already has a volume" in err
    s = js(cli, "snapshot", "p", "v", "s", "--read-only")
    assert s["kind"] == "snapshot" and s["origin"] == "v" and s["read_only"] and s["dev_id"] == 1
    active = js(cli, "volume", "activate", "p", "v")
    assert active["device"] == "/dev/fake-thinmgr/p/v" and active["state"] == "active"
    code, out, _ = cli("volume", "activate", "p", "v")
    assert out.strip() == "/dev/fake-thinmgr/p/v"
    # a snapshot of an active origin is taken suspended (the fake refuses it otherwise)
    assert js(cli, "snapshot", "p", "v", "s2")["dev_id"] == 2
    assert js(cli, "volume", "resize", "p", "v", "--size", "1M")["size"] == 1 << 20
    code, _, err = cli("volume", "resize", "p", "v", "--size", "64K")
    assert code == ExitCode.USAGE and "shrinking" in err
    shown = js(cli, "volume", "show", "p", "v")
    assert shown["open_count"] == 0 and shown["mapped_blocks"] == 0
    names = [(x["pool"], x["name"]) for x in js(cli, "volume", "list")]
    assert names == [("p", "s"), ("p", "s2"), ("p", "v")]
    assert len(js(cli, "volume", "list", "p")) == 3
    code, _, err = cli("pool", "destroy", "p", "--force")
    assert code == ExitCode.BUSY and "active volumes" in err
    assert cli("volume", "deactivate", "p", "v")[0] == 0
    removed = js(cli, "volume", "remove", "p", "s")
    assert removed == {"pool": "p", "name": "s", "removed": True, "deferred": False}
    assert fake_engine.load(run_dir(home, "p"))["devices"].keys() == {"0", "2"}
    # ids are never reused
    assert js(cli, "volume", "create", "p", "w", "--size", "1M")["dev_id"] == 3
    code, _, err = cli("pool", "destroy", "p")
    assert code == ExitCode.CONFLICT and "--force" in err
    assert cli("pool", "destroy", "p", "--force")[0] == 0
    assert js(cli, "volume", "list") == []


def test_open_volume_is_refused_then_forced(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "1G")
    js(cli, "volume", "create", "p", "v", "--size", "1G")
    js(cli, "volume", "activate", "p", "v")
    fake_engine.set_volume(run_dir(home, "p"), 0, open_count=1)
    code, _, err = cli("volume", "remove", "p", "v")
    assert code == ExitCode.BUSY and "is open" in err
    code, _, err = cli("volume", "deactivate", "p", "v")
    assert code == ExitCode.BUSY
    assert js(cli, "volume", "remove", "p", "v", "--force")["removed"] is True
    assert fake_engine.load(run_dir(home, "p"))["devices"] == {}


def test_busy_removal_is_deferred_then_finished(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "1G")
    js(cli, "volume", "create", "p", "v", "--size", "1G")
    js(cli, "volume", "activate", "p", "v")
    fake_engine.set_volume(run_dir(home, "p"), 0, busy=100)  # EBUSY, flaky-busy
    result = js(cli, "volume", "remove", "p", "v")
    assert result["deferred"] is True and result["removed"] is False
    assert [v["state"] for v in js(cli, "volume", "list", "p")] == ["deleting"]
    assert any("deferred" in w for w in js(cli, "pool", "status", "p")["warnings"])
    code, out, _ = cli("--json", "doctor")
    assert code == ExitCode.CATALOG_DRIFT
    assert [f["kind"] for f in json.loads(out)["findings"]] == ["deferred-removal"]
    code, _, _ = cli("volume", "activate", "p", "v")
    assert code == ExitCode.CONFLICT
    fake_engine.set_volume(run_dir(home, "p"), 0, busy=0)
    # the next command on the pool finishes it
    js(cli, "volume", "create", "p", "w", "--size", "1G")
    assert [v["name"] for v in js(cli, "volume", "list", "p")] == ["w"]
    assert fake_engine.load(run_dir(home, "p"))["devices"].keys() == {"1"}
    assert cli("doctor")[0] == 0


def test_pool_full_warns_and_extend_helps(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "640K")  # 10 blocks
    js(cli, "volume", "create", "p", "v", "--size", "1G")
    fake_engine.write_blocks(run_dir(home, "p"), 0, 9)
    status = js(cli, "pool", "status", "p")
    assert status["data_used_percent"] == 90.0
    assert any("data space is 90.0% used" in w for w in status["warnings"])
    with pytest.raises(fake_engine.NoSpaceError):
        fake_engine.write_blocks(run_dir(home, "p"), 0, 2)
    js(cli, "pool", "extend", "p", "--size", "1280K")
    fake_engine.write_blocks(run_dir(home, "p"), 0, 2)
    assert js(cli, "pool", "status", "p")["warnings"] == []


def test_bad_input_creates_nothing(cli: Cli, home: Path, tmp_path: Path) -> None:
    cases = [
        (["pool", "create", "a/b", "--size", "1G"], ExitCode.USAGE),
        (["pool", "create", ".hidden", "--size", "1G"], ExitCode.USAGE),
        (["pool", "create", "-x", "--size", "1G"], ExitCode.USAGE),
        (["pool", "create", "x" * 57, "--size", "1G"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "lots"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1K"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1G", "--block-size", "32K"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1G", "--block-size", "2G"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1G", "--metadata-size", "1M"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "2000000P"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1G", "--low-water-mark", "20000"], ExitCode.USAGE),
        (["pool", "create", "p"], ExitCode.USAGE),
        (["pool", "create", "p", "--size", "1G", "--data", "/dev/null"], ExitCode.USAGE),
        (
            [
                "pool",
                "create",
                "p",
                "--data",
                str(tmp_path / "no"),
                "--metadata",
                str(tmp_path / "no2"),
            ],
            ExitCode.NOT_FOUND,
        ),
        (["pool", "create", "p", "--data", "/dev/null", "--metadata", "/dev/zero"], ExitCode.USAGE),
        (["pool", "status", "nope"], ExitCode.NOT_FOUND),
        (["volume", "create", "nope", "v", "--size", "1G"], ExitCode.NOT_FOUND),
    ]
    for args, expected in cases:
        code, _, err = cli(*args)
        assert code == expected, (args, err)
        assert "error" in err.lower() and "Traceback" not in err
    assert not (home / "pools").exists() or list((home / "pools").iterdir()) == []
    assert js(cli, "pool", "list") == []
    js(cli, "pool", "create", "p", "--size", "1G")
    for args, expected in [
        (["pool", "create", "p", "--size", "1G"], ExitCode.CONFLICT),
        (["volume", "create", "p", "v", "--size", "0"], ExitCode.USAGE),
        (["volume", "create", "p", "v/w", "--size", "1G"], ExitCode.USAGE),
        (["volume", "create", "p", "v", "--size", "99999999P"], ExitCode.USAGE),
        (["volume", "show", "p", "nope"], ExitCode.NOT_FOUND),
        (["snapshot", "p", "nope", "s"], ExitCode.NOT_FOUND),
    ]:
        code, _, err = cli(*args)
        assert code == expected, (args, err)
    assert js(cli, "volume", "list") == [] and js(cli, "pool", "status", "p")["next_device_id"] == 0


def test_kernel_engine_refused_without_device_mapper(
    cli: Cli, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("THINMGR_ENGINE_FACTORY")
    code, _, err = cli("pool", "create", "p", "--engine", "kernel", "--size", "1G")
    assert code == ExitCode.UNSUPPORTED and "kernel engine" in err
    assert not (home / "pools" / "p").exists()


def test_engine_failure_removes_created_files(
    cli: Cli, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, spec: object) -> None:
        raise fake_engine.BusyError("activation failed")

    monkeypatch.setattr(fake_engine.FakeEngine, "activate_pool", broken)
    code, _, err = cli("pool", "create", "p", "--size", "1G")
    assert code == ExitCode.BUSY and "activation failed" in err
    assert not (home / "pools" / "p").exists()
    monkeypatch.undo()


def test_devices_are_checked(
    cli: Cli, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THINMGR_ENGINE_FACTORY", fake_engine.FACTORY)
    data, meta = tmp_path / "data.img", tmp_path / "meta.img"
    data.write_bytes(b"")
    os.truncate(data, 64 << 20)
    meta.write_bytes(b"")
    os.truncate(meta, 4 << 20)
    # an ext4 superblock magic at 1080 on the data device
    with open(data, "r+b") as f:
        f.seek(1080)
        f.write(struct.pack("<H", 0xEF53))
    code, _, err = cli("pool", "create", "p", "--data", str(data), "--metadata", str(meta))
    assert code == ExitCode.CONFLICT and "ext2/3/4" in err
    code, _, err = cli("pool", "create", "p", "--data", str(data), "--metadata", str(data))
    assert code == ExitCode.USAGE
    info = js(cli, "pool", "create", "p", "--data", str(data), "--metadata", str(meta), "--force")
    assert info["data_path"] == str(data) and not info["file_backed"]
    assert js(cli, "pool", "status", "p")["total_data_blocks"] == 1024
    assert cli("pool", "destroy", "p")[0] == 0
    assert data.exists() and meta.exists()  # devices given by path are left alone


def test_transaction_id_drift_is_reported_not_trampled(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "1G")
    js(cli, "volume", "create", "p", "v", "--size", "1G")
    fake_engine.tamper(run_dir(home, "p"), tid=113)  # another manager advanced it
    code, _, err = cli("volume", "create", "p", "w", "--size", "1G")
    assert code == ExitCode.CATALOG_DRIFT and "113" in err
    assert fake_engine.load(run_dir(home, "p"))["tid"] == 113
    status = js(cli, "pool", "status", "p")
    assert any("another tool" in w for w in status["warnings"])
    code, out, _ = cli("--json", "doctor", "--fix")
    assert code == ExitCode.CATALOG_DRIFT
    assert json.loads(out)["findings"][0]["kind"] == "transaction-id-drift"
    assert cli("doctor", "--fix", "--adopt")[0] == 0
    assert js(cli, "volume", "create", "p", "w", "--size", "1G")["dev_id"] == 1
    assert fake_engine.load(run_dir(home, "p"))["tid"] == 114


def test_doctor_repairs(cli: Cli, home: Path) -> None:
    js(cli, "pool", "create", "p", "--size", "1G")
    for name in ("a", "b", "c"):
        js(cli, "volume", "create", "p", name, "--size", "1G")
    js(cli, "volume", "activate", "p", "c")
    rd = run_dir(home, "p")
    fake_engine.tamper(rd, add_device=77, drop_device=1, held=42)
    state = fake_engine.load(rd)
    state["volumes"].pop("2")  # "after a reboot": c no longer served
    fake_engine.save(rd, state)
    (home / "pools" / "half").mkdir(parents=True)
    (home / "pools" / "half" / "thinmgr-pool").write_text("half\n")
    code, out, _ = cli("--json", "doctor")
    assert code == ExitCode.CATALOG_DRIFT
    kinds = sorted(f["kind"] for f in json.loads(out)["findings"])
    assert kinds == [
        "held-metadata-snapshot",
        "leftover-files",
        "missing-device",
        "orphan-device",
        "volume-state",
    ]
    code, out, _ = cli("--json", "doctor", "--fix")
    assert code == 0 and all(f["fixed"] for f in json.loads(out)["findings"])
    assert (
        fake_engine.load(rd)["devices"].keys() == {"0", "2"}
        and fake_engine.load(rd)["held"] is None
    )
    assert {v["name"]: v["state"] for v in js(cli, "volume", "list")} == {
        "a": "inactive",
        "c": "inactive",
    }
    assert not (home / "pools" / "half").exists()
    assert cli("doctor")[0] == 0


def test_lock_names_its_holder(cli: Cli, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thinmgr.ops.locks import pool_lock

    js(cli, "pool", "create", "p", "--size", "1G")
    monkeypatch.setenv("THINMGR_LOCK_WAIT", "0.2")
    import multiprocessing

    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold() -> None:
        with pool_lock(home, "p"):
            ready.set()
            release.wait(10)

    proc = multiprocessing.get_context("fork").Process(target=hold)
    proc.start()
    try:
        assert ready.wait(10)
        code, _, err = cli("volume", "create", "p", "v", "--size", "1G")
        assert code == ExitCode.BUSY and f"pid {proc.pid}" in err
        # readers do not wait for writers
        assert js(cli, "pool", "status", "p")["name"] == "p"
        assert js(cli, "volume", "list") == []
    finally:
        release.set()
        proc.join(10)
    assert js(cli, "volume", "create", "p", "v", "--size", "1G")["dev_id"] == 0


def test_destroy_refuses_a_pool_with_images_unless_forced(cli: Cli, home: Path) -> None:
    from thinmgr.catalog.db import open_catalog
    from thinmgr.catalog.models import Device, Image, Layer

    js(cli, "pool", "create", "p", "--size", "1G")
    js(cli, "volume", "create", "p", "base", "--size", "64M")
    digest = "sha256:" + "ab" * 32
    catalog = open_catalog(home)
    try:
        with catalog.write() as session:
            device = session.query(Device).filter_by(name="base").one()
            layer = Layer(
                pool_id=device.pool_id,
                digest=digest,
                diff_id=digest,
                chain_id=digest,
                device_id=device.id,
                size_bytes=0,
            )
            session.add(layer)
            session.flush()
            session.add(Image(name="img", pool_id=device.pool_id, top_layer_id=layer.id))
    finally:
        catalog.close()
    code, _, err = cli("pool", "destroy", "p")
    assert code == ExitCode.CONFLICT and "image layers" in err
    assert js(cli, "pool", "list")[0]["name"] == "p"
    code, _, err = cli("pool", "destroy", "p", "--force")
    assert code == 0, err
    assert js(cli, "pool", "list") == []
    catalog = open_catalog(home)
    try:
        with catalog.read() as session:
            assert session.query(Image).count() == 0 and session.query(Layer).count() == 0
    finally:
        catalog.close()
