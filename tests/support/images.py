"""Builders of container images for tests: layer tars, OCI layouts and archives, docker save.

Everything is built in memory from a small spec, offline. ``busybox_image`` writes the
2-layer busybox image of runtime-and-images.md section 6 in any source kind:

- layer 1: the busybox root (tests/support/busybox.py) + /etc/motd + /var/cache/x/{a,b}
- layer 2: deletes /etc/motd (explicit whiteout), makes /var/cache/x opaque holding only c,
  adds /etc/hello
- config: Cmd ["/bin/sh"], Env PATH.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from tests.support.busybox import rootfs_tar_bytes

MTIME = 1_700_000_000
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {
    "": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
BUSYBOX_CONFIG = {
    "Cmd": ["/bin/sh"],
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
}
IMAGE_KINDS = ("oci-layout", "oci-archive", "docker-archive", "docker-archive-25")


# ------------------------------------------------------------------------------ layer tars


@dataclass
class Entry:
    """One member of a layer tar. ``kind``: file dir symlink hardlink char block fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    link: str = ""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = MTIME
    major: int = 0
    minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    pax: dict[str, str] = field(default_factory=dict)  # raw pax records (path=..., etc.)


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(name, "file", data, mode=mode, **kw)


def directory(name: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(name, "dir", mode=mode, **kw)


def symlink(name: str, target: str, **kw: Any) -> Entry:
    kw.setdefault("mode", 0o777)
    return Entry(name, "symlink", link=target, **kw)


def hardlink(name: str, target: str, **kw: Any) -> Entry:
    kw.setdefault("mode", 0o644)
    return Entry(name, "hardlink", link=target, **kw)


def chardev(name: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    return Entry(name, "char", mode=mode, major=major, minor=minor)


def blockdev(name: str, major: int, minor: int, mode: int = 0o660) -> Entry:
    return Entry(name, "block", mode=mode, major=major, minor=minor)


def fifo(name: str, mode: int = 0o644) -> Entry:
    return Entry(name, "fifo", mode=mode)


def whiteout(parent: str, name: str) -> Entry:
    return file(f"{parent}/.wh.{name}" if parent else f".wh.{name}")


def opaque(parent: str) -> Entry:
    return file(f"{parent}/.wh..wh..opq" if parent else ".wh..wh..opq")


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_info(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.name)
    info.type = _TYPES[entry.kind]
    info.mode = entry.mode if entry.mode is not None else 0o644
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime  # type: ignore[assignment]
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.major, entry.minor
    info.size = len(entry.data) if entry.kind == "file" else 0
    headers = dict(entry.pax)
    for key, value in entry.xattrs.items():
        headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = headers
    return info


def layer_tar(entries: Iterable[Entry], *, base: bytes | None = None) -> bytes:
    """An uncompressed layer tar (PAX) holding ``base``'s members first, then ``entries``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if base is not None:
            with tarfile.open(fileobj=io.BytesIO(base)) as source:
                for member in source:
                    tar.addfile(member, source.extractfile(member) if member.isreg() else None)
        for entry in entries:
            data = io.BytesIO(entry.data) if entry.kind == "file" else None
            tar.addfile(tar_info(entry), data)
    return buffer.getvalue()


def compress(data: bytes, how: str) -> bytes:
    """``how``: "" (none), "gzip"/"gz", "zstd", "bz2", "xz"."""
    if how in ("", "none"):
        return data
    if how in ("gzip", "gz"):
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if how == "bz2":
        return bz2.compress(data)
    if how == "xz":
        return lzma.compress(data)
    raise ValueError(how)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def image_config(layers: Sequence[bytes], config: dict[str, Any]) -> dict[str, Any]:
    """A full OCI image config with the diff_ids of the (uncompressed) ``layers``."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]},
    }


# ------------------------------------------------------------------------------ OCI


def oci_files(
    layers: Sequence[bytes],
    config: dict[str, Any],
    *,
    tag: str | None = "latest",
    compress_with: str = "gzip",
    full_config: dict[str, Any] | None = None,
    manifest_media_type: bool = True,
    nested: bool = False,
    extra_index: Sequence[dict[str, Any]] = (),
) -> dict[str, bytes]:
    """The files of an OCI image layout, by path. ``nested`` puts the manifest behind a
    multi-arch index that also names a linux/arm64 decoy."""
    files: dict[str, bytes] = {"oci-layout": json_bytes({"imageLayoutVersion": "1.0.0"})}

    def add_blob(data: bytes) -> str:
        blob = digest(data)
        files[f"blobs/sha256/{blob.split(':')[1]}"] = data
        return blob

    config_data = json_bytes(full_config or image_config(layers, config))
    layer_descs = []
    for layer in layers:
        blob = compress(layer, compress_with)
        layer_descs.append(
            {"mediaType": LAYER_TYPES[compress_with], "digest": add_blob(blob), "size": len(blob)}
        )
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": add_blob(config_data),
            "size": len(config_data),
        },
        "layers": layer_descs,
    }
    if manifest_media_type:
        manifest["mediaType"] = OCI_MANIFEST
    manifest_data = json_bytes(manifest)
    top: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": add_blob(manifest_data),
        "size": len(manifest_data),
        "platform": {"architecture": "amd64", "os": "linux"},
    }
    if nested:
        decoy_config = json_bytes({"architecture": "arm64", "os": "linux"})
        decoy = {
            "mediaType": OCI_MANIFEST,
            "digest": add_blob(decoy_config),  # never read: the arm64 image is not picked
            "size": len(decoy_config),
            "platform": {"architecture": "arm64", "os": "linux"},
        }
        inner = json_bytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [decoy, top]})
        top = {"mediaType": OCI_INDEX, "digest": add_blob(inner), "size": len(inner)}
    if tag is not None:
        top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top, *extra_index]}
    files["index.json"] = json_bytes(index)
    return files


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_oci_layout(
    dest: Path,
    layers: Sequence[bytes],
    config: dict[str, Any],
    tag: str = "latest",
    compress: str = "gzip",
    **kw: Any,
) -> Path:
    return write_files(dest, oci_files(layers, config, tag=tag, compress_with=compress, **kw))


def archive_bytes(
    files: dict[str, bytes], *, symlinks: dict[str, str] | None = None, outer: str = ""
) -> bytes:
    """A tar of ``files`` (+ ``symlinks`` name -> target), compressed with ``outer``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name in files:
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for name in sorted(dirs):
            tar.addfile(tar_info(directory(name)))
        for name, data in files.items():
            tar.addfile(tar_info(file(name, data)), io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            tar.addfile(tar_info(symlink(name, target)))
    return compress(buffer.getvalue(), outer)


def write_oci_archive(
    path: Path,
    layers: Sequence[bytes],
    config: dict[str, Any],
    tag: str = "latest",
    compress: str = "gzip",
    outer: str = "",
    **kw: Any,
) -> Path:
    files = oci_files(layers, config, tag=tag, compress_with=compress, **kw)
    path.write_bytes(archive_bytes(files, outer=outer))
    return path


def docker_files(
    layers: Sequence[bytes],
    config: dict[str, Any],
    *,
    repo_tag: str = "busybox:latest",
    legacy: bool = True,
    full_config: dict[str, Any] | None = None,
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Files and symlinks of a docker save archive: legacy (skopeo: ``<diffid>.tar`` with
    ``<v1id>/layer.tar`` symlinks to it) or Docker >= 25 (an OCI layout + manifest.json)."""
    config_data = json_bytes(full_config or image_config(layers, config))
    tags = [repo_tag] if repo_tag else []
    if legacy:
        files: dict[str, bytes] = {}
        symlinks: dict[str, str] = {}
        names = []
        for i, layer in enumerate(layers):
            hex_id = digest(layer).split(":")[1]
            files[f"{hex_id}.tar"] = layer
            v1 = hashlib.sha256(f"v1-{i}-{hex_id}".encode()).hexdigest()
            files[f"{v1}/VERSION"] = b"1.0"
            files[f"{v1}/json"] = json_bytes({"id": v1})
            symlinks[f"{v1}/layer.tar"] = f"../{hex_id}.tar"
            names.append(f"{v1}/layer.tar")
        config_name = digest(config_data).split(":")[1] + ".json"
        files[config_name] = config_data
        manifest = [{"Config": config_name, "RepoTags": tags, "Layers": names}]
        files["manifest.json"] = json_bytes(manifest)
        files["repositories"] = json_bytes({})
        return files, symlinks
    files = oci_files(
        layers, config, tag=repo_tag.rsplit(":", 1)[-1], compress_with="", full_config=full_config
    )
    manifest = [
        {
            "Config": f"blobs/sha256/{digest(config_data).split(':')[1]}",
            "RepoTags": tags,
            "Layers": [f"blobs/sha256/{digest(layer).split(':')[1]}" for layer in layers],
        }
    ]
    files["manifest.json"] = json_bytes(manifest)
    return files, {}


def write_docker_archive(
    path: Path,
    layers: Sequence[bytes],
    config: dict[str, Any],
    repo_tag: str = "busybox:latest",
    legacy: bool = True,
    outer: str = "",
    **kw: Any,
) -> Path:
    files, links = docker_files(layers, config, repo_tag=repo_tag, legacy=legacy, **kw)
    path.write_bytes(archive_bytes(files, symlinks=links, outer=outer))
    return path


# ------------------------------------------------------------------------------ busybox


@functools.cache
def busybox_rootfs() -> bytes:
    """The busybox rootfs tar, made once per process (its mtimes are those of the moment)."""
    return rootfs_tar_bytes()


@functools.cache
def busybox_layers(opaque_first: bool = True) -> tuple[bytes, bytes]:
    """The two layers of the busybox test image (``opaque_first``: where layer 2 puts its
    opaque marker: before or after the directory's new child)."""
    layer1 = layer_tar(
        [
            file("etc/motd", b"welcome\n"),
            directory("var/cache"),
            directory("var/cache/x"),
            file("var/cache/x/a", b"a\n"),
            file("var/cache/x/b", b"b\n"),
        ],
        base=busybox_rootfs(),
    )
    marker = [opaque("var/cache/x")]
    child = [file("var/cache/x/c", b"c\n")]
    layer2 = layer_tar(
        [
            directory("etc"),
            whiteout("etc", "motd"),
            file("etc/hello", b"hello\n"),
            directory("var/cache/x"),
            *(marker + child if opaque_first else child + marker),
        ]
    )
    return layer1, layer2


@functools.cache
def busybox_flat_tar() -> bytes:
    """The busybox image's final tree as one rootfs tar (what applying both layers gives)."""
    return layer_tar(
        [
            file("etc/hello", b"hello\n"),
            directory("var/cache"),
            directory("var/cache/x"),
            file("var/cache/x/c", b"c\n"),
        ],
        base=busybox_rootfs(),
    )


def busybox_image(dest: Path, kind: str = "oci-layout", **kw: Any) -> Path:
    """Writes the 2-layer busybox image at ``dest`` as ``kind``: "oci-layout" (a directory),
    "oci-archive", "docker-archive" (legacy/skopeo) or "docker-archive-25"."""
    layers = list(busybox_layers(kw.pop("opaque_first", True)))
    if kind == "oci-layout":
        return write_oci_layout(dest, layers, BUSYBOX_CONFIG, **kw)
    if kind == "oci-archive":
        return write_oci_archive(dest, layers, BUSYBOX_CONFIG, **kw)
    if kind == "docker-archive":
        return write_docker_archive(dest, layers, BUSYBOX_CONFIG, legacy=True, **kw)
    if kind == "docker-archive-25":
        return write_docker_archive(dest, layers, BUSYBOX_CONFIG, legacy=False, **kw)
    raise ValueError(kind)


def rootfs_tarball(dest: Path, compression: str = "") -> Path:
    """The flattened busybox tree as a rootfs tarball (``compression``: "", gz, bz2, xz, zstd)."""
    dest.write_bytes(compress(busybox_flat_tar(), compression))
    return dest
