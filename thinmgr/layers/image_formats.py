"""Container image formats: docker ``manifest.json``, OCI index/manifest/config, ChainIDs.

Pure: JSON bytes in, dataclasses out; reading blobs is the caller's job (``read_blob``
callbacks, which must verify digest and size). References: OCI image-spec (image-layout.md,
image-index.md, manifest.md, config.md, layer.md), Docker's ``docker save`` format and
runtime-and-images.md section 4.1.

Every document is checked against what the referring descriptor said it is: a manifest must
not look like an index and the other way round, and a config descriptor must carry a config
media type (CVE-2021-41190, media-type confusion).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from thinmgr.errors import CorruptImageError, NotFoundError, UnsupportedError, UsageError

KIND_OCI_LAYOUT = "oci-layout"
KIND_OCI_ARCHIVE = "oci-archive"
KIND_DOCKER_ARCHIVE = "docker-archive"
KIND_ROOTFS_TAR = "rootfs-tar"

# OCI image-spec media types (specs-go/v1/mediatype.go) and Docker's schema 2 equivalents.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Layers of bare rootfs tarballs and docker-archive members carry no media type: the source
# reader sniffs their compression and names it with one of these (bzip2/xz have no OCI type).
THINMGR_LAYER_BZIP2 = "application/vnd.thinmgr.layer.v1.tar+bzip2"
THINMGR_LAYER_XZ = "application/vnd.thinmgr.layer.v1.tar+xz"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"  # what Docker >= 25 writes as well

MAX_INDEX_DEPTH = 4  # an index naming an index naming ... (multi-arch images need 2)
DEFAULT_PLATFORM = ("linux", "amd64")

_DIGEST = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    XZ = "xz"


_LAYER_COMPRESSION: dict[str, Compression] = {
    OCI_LAYER_TAR: Compression.NONE,
    OCI_LAYER_GZIP: Compression.GZIP,
    OCI_LAYER_ZSTD: Compression.ZSTD,
    # Deprecated by image-spec 1.1 but still valid to read.
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
    THINMGR_LAYER_BZIP2: Compression.BZIP2,
    THINMGR_LAYER_XZ: Compression.XZ,
}

MEDIA_TYPE_OF_COMPRESSION = {
    Compression.NONE: OCI_LAYER_TAR,
    Compression.GZIP: OCI_LAYER_GZIP,
    Compression.ZSTD: OCI_LAYER_ZSTD,
    Compression.BZIP2: THINMGR_LAYER_BZIP2,
    Compression.XZ: THINMGR_LAYER_XZ,
}


def layer_compression(media_type: str) -> Compression:
    """The compression a layer media type implies; UnsupportedError for any other type."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise UnsupportedError(
            f"layer media type {media_type!r} is not supported",
            hint="Supported: OCI layer tar, tar+gzip and tar+zstd, and Docker's tar.gzip layers.",
        ) from None


@dataclass(frozen=True)
class LayerDescriptor:
    digest: str | None  # blob digest "sha256:..." as stored (None for a bare rootfs tarball)
    diff_id: str | None  # from the config's rootfs.diff_ids (None for a bare rootfs tarball)
    media_type: str  # OCI/Docker layer media type; decides the compression
    size: int | None  # blob size in bytes when the manifest says it
    location: str  # where the blob is: archive member name or path under the layout


@dataclass(frozen=True)
class ImageDescription:
    kind: str  # "oci-layout" | "oci-archive" | "docker-archive" | "rootfs-tar"
    tags: list[str]  # repo tags / ref names found in the source, may be empty
    config_digest: str | None
    config: dict[str, Any]  # the OCI config's "config" section ({} for a rootfs tar)
    layers: list[LayerDescriptor]  # bottom first


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (descriptor.md)."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        """The reference names the descriptor carries (ref.name, containerd's image name)."""
        found = []
        for key in (REF_NAME_ANNOTATION, CONTAINERD_NAME_ANNOTATION):
            value = self.annotations.get(key)
            if value and value not in found:
                found.append(value)
        return found


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: list[str]
    config: dict[str, Any]


@dataclass(frozen=True)
class DockerManifestEntry:
    """One element of docker save's ``manifest.json`` array."""

    config: str  # member name of the config JSON
    repo_tags: list[str]
    layers: list[str]  # member names, bottom first


# ------------------------------------------------------------------------------ digests


def check_digest(value: object, what: str) -> str:
    """``value`` if it is ``sha256:`` + 64 lowercase hex digits; a clear error otherwise."""
    if not isinstance(value, str) or not (match := _DIGEST.fullmatch(value)):
        raise CorruptImageError(f"{what}: {value!r} is not a digest (want sha256:<64 hex>)")
    algorithm, encoded = match.groups()
    if algorithm != "sha256":
        raise UnsupportedError(
            f"{what}: digest algorithm {algorithm!r} is not supported (only sha256)",
            hint="Re-export the image with sha256 digests (the OCI and Docker default).",
        )
    if not _SHA256_HEX.fullmatch(encoded):
        raise CorruptImageError(f"{what}: {value!r} is not a sha256 digest (want 64 hex digits)")
    return value


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(digest: str) -> str:
    """Where image-layout.md keeps a blob: ``blobs/<alg>/<encoded>`` (digest already checked)."""
    algorithm, encoded = digest.split(":", 1)
    return f"blobs/{algorithm}/{encoded}"


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainIDs of a layer stack, bottom first (OCI config.md, "Layer ChainID"):
    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        check_digest(diff_id, "diff_id")
        if not chains:
            chains.append(diff_id)
        else:
            chains.append(sha256_digest(f"{chains[-1]} {diff_id}".encode()))
    return chains


# ------------------------------------------------------------------------------ JSON


def load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise CorruptImageError(f"{what} is not valid JSON: {error}") from None


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CorruptImageError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _string_list(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptImageError(f"{what} must be a list of strings")
    return list(value)


def parse_descriptor(value: object, what: str) -> Descriptor:
    doc = _object(value, what)
    media_type = doc.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise CorruptImageError(f"{what} has no mediaType")
    size = doc.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CorruptImageError(f"{what} has no valid size")
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise CorruptImageError(f"{what}: annotations must map strings to strings")
    platform = doc.get("platform")
    if platform is not None:
        platform = _object(platform, f"{what} platform")
    return Descriptor(
        media_type, check_digest(doc.get("digest"), f"{what} digest"), size, annotations, platform
    )


def _check_schema(doc: dict[str, Any], what: str) -> None:
    if doc.get("schemaVersion") != 2:
        raise UnsupportedError(
            f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not supported (only 2)",
            hint="Docker schema 1 images are obsolete; pull and save the image again.",
        )


def parse_index(data: bytes, what: str = "index.json") -> list[Descriptor]:
    """The ``manifests`` of an OCI image index (or Docker manifest list)."""
    doc = _object(load_json(data, what), what)
    _check_schema(doc, what)
    media_type = doc.get("mediaType")
    if media_type is not None and media_type not in INDEX_TYPES:
        raise CorruptImageError(f"{what}: mediaType {media_type!r} is not an image index")
    if "layers" in doc or "config" in doc:  # CVE-2021-41190: a manifest posing as an index
        raise CorruptImageError(f"{what}: an index must not have 'config' or 'layers'")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise CorruptImageError(f"{what} has no 'manifests' list")
    return [parse_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(manifests)]


def parse_manifest(data: bytes, expected_media_type: str | None, what: str) -> Manifest:
    """An OCI image manifest (or Docker schema 2 manifest) named by a descriptor whose media
    type was ``expected_media_type``. ``mediaType`` inside is optional (OCI 1.0; umoci omits
    it) but must agree when present."""
    doc = _object(load_json(data, what), what)
    _check_schema(doc, what)
    media_type = doc.get("mediaType")
    if media_type is not None:
        if media_type not in MANIFEST_TYPES:
            raise CorruptImageError(f"{what}: mediaType {media_type!r} is not an image manifest")
        if expected_media_type is not None and media_type != expected_media_type:
            raise CorruptImageError(
                f"{what}: mediaType {media_type!r} differs from the descriptor's "
                f"{expected_media_type!r}"
            )
    if "manifests" in doc:  # CVE-2021-41190: an index posing as a manifest
        raise CorruptImageError(f"{what}: an image manifest must not have 'manifests'")
    config = parse_descriptor(doc.get("config"), f"{what} config")
    if config.media_type not in CONFIG_TYPES:
        raise CorruptImageError(
            f"{what}: config media type {config.media_type!r} is not an image config",
            hint="This is not a container image (an OCI artifact?) or it was tampered with.",
        )
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise CorruptImageError(f"{what} has no 'layers' list")
    parsed = [parse_descriptor(d, f"{what} layers[{i}]") for i, d in enumerate(layers)]
    for layer in parsed:
        layer_compression(layer.media_type)  # refuse unknown layer types now, not mid-import
    return Manifest(config, parsed)


def parse_config(data: bytes, layer_count: int, what: str = "image config") -> ImageConfig:
    """The config's ``rootfs.diff_ids`` (one per layer) and its ``config`` section."""
    doc = _object(load_json(data, what), what)
    if "layers" in doc or "manifests" in doc:
        raise CorruptImageError(f"{what} looks like a manifest or index, not an image config")
    os_name = doc.get("os")
    if os_name is not None and os_name != "linux":
        raise UnsupportedError(f"{what}: image is for os {os_name!r}; only linux is supported")
    rootfs = _object(doc.get("rootfs"), f"{what} rootfs")
    if rootfs.get("type") != "layers":
        raise CorruptImageError(f"{what}: rootfs.type must be 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise CorruptImageError(f"{what}: rootfs.diff_ids must be a list")
    diff_ids = [check_digest(d, f"{what} rootfs.diff_ids[{i}]") for i, d in enumerate(raw_ids)]
    if len(diff_ids) != layer_count:
        raise CorruptImageError(
            f"{what} names {len(diff_ids)} diff_ids but the manifest has {layer_count} layers"
        )
    section = doc.get("config")
    return ImageConfig(diff_ids, {} if section is None else _object(section, f"{what} config"))


def parse_docker_manifest(data: bytes) -> list[DockerManifestEntry]:
    """docker save's ``manifest.json``: a JSON array of {Config, RepoTags, Layers}."""
    doc = load_json(data, "manifest.json")
    if not isinstance(doc, list) or not doc:
        raise CorruptImageError("manifest.json must be a non-empty JSON array")
    entries = []
    for i, raw in enumerate(doc):
        what = f"manifest.json[{i}]"
        item = _object(raw, what)
        config = item.get("Config")
        if not isinstance(config, str) or not config:
            raise CorruptImageError(f"{what} has no Config")
        layers = _string_list(item.get("Layers"), f"{what} Layers")
        entries.append(
            DockerManifestEntry(
                config, _string_list(item.get("RepoTags"), f"{what} RepoTags"), layers
            )
        )
    return entries


def digest_in_member_name(name: str) -> str | None:
    """The digest a member name spells: ``blobs/sha256/<hex>`` (Docker >= 25) or
    ``<hex>.tar`` / ``<hex>.json`` (skopeo, legacy docker save)."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
        return f"sha256:{parts[2]}" if _SHA256_HEX.fullmatch(parts[2]) else None
    base = parts[-1]
    stem, _, extension = base.rpartition(".")
    if extension in ("tar", "json") and _SHA256_HEX.fullmatch(stem):
        return f"sha256:{stem}"
    return None


# ------------------------------------------------------------------------------ tags


def _normalise_ref(ref: str) -> str:
    for prefix in ("docker.io/", "index.docker.io/"):
        if ref.startswith(prefix):
            ref = ref[len(prefix) :]
    if ref.startswith("library/"):
        ref = ref[len("library/") :]
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        ref += ":latest"
    return ref


def tag_matches(found: str, wanted: str) -> bool:
    """Whether a tag found in a source (RepoTags entry or ref name) is the one asked for.

    ``busybox`` = ``busybox:latest`` = ``docker.io/library/busybox:latest``; a bare OCI ref
    name such as ``latest`` matches on the tag part alone."""
    if found == wanted:
        return True
    if "/" not in found and ":" not in found:  # a bare OCI ref name: just a tag
        wanted_last = wanted.rsplit("/", 1)[-1]
        return ":" in wanted_last and wanted_last.rsplit(":", 1)[1] == found
    return _normalise_ref(found) == _normalise_ref(wanted)


def _choose(candidates: list[list[str]], tag: str | None, source: str) -> int:
    """Index of the image to take among ``candidates`` (each a list of its tags)."""
    if tag is not None:
        hits = [i for i, tags in enumerate(candidates) if any(tag_matches(t, tag) for t in tags)]
        if not hits:
            known = sorted({t for tags in candidates for t in tags})
            raise NotFoundError(
                f"{source} holds no image tagged {tag!r}",
                hint=f"Tags found: {', '.join(known) or '(none)'}.",
            )
        return hits[0]
    if len(candidates) == 1:
        return 0
    known = sorted({t for tags in candidates for t in tags})
    raise UsageError(
        f"{source} holds {len(candidates)} images; say which one to import",
        hint=f"Pass a tag; found: {', '.join(known) or '(untagged images)'}.",
    )


# ------------------------------------------------------------------------------ OCI


def _pick_platform(manifests: list[Descriptor], platform: tuple[str, str], what: str) -> Descriptor:
    if len(manifests) == 1 and manifests[0].platform is None:
        return manifests[0]
    wanted_os, wanted_arch = platform
    for desc in manifests:
        plat = desc.platform or {}
        if plat.get("os") == wanted_os and plat.get("architecture") == wanted_arch:
            return desc
    found = [
        f"{(d.platform or {}).get('os', '?')}/{(d.platform or {}).get('architecture', '?')}"
        for d in manifests
    ]
    raise UnsupportedError(
        f"{what} has no {wanted_os}/{wanted_arch} image (found: {', '.join(found) or 'none'})"
    )


BlobReader = Callable[[Descriptor], bytes]


def describe_oci(
    index_data: bytes,
    read_blob: BlobReader,
    *,
    kind: str,
    tag: str | None,
    source: str,
    platform: tuple[str, str] = DEFAULT_PLATFORM,
) -> ImageDescription:
    """Describe the image an OCI layout's ``index.json`` leads to.

    Images are grouped by ref name; ``tag`` picks a group; within a group (and in nested
    indexes) the ``platform`` image is taken. ``read_blob`` returns a blob's bytes after
    checking its digest and size against the descriptor."""
    top = parse_index(index_data)
    if not top:
        raise CorruptImageError(f"{source}: index.json lists no images")
    groups: dict[tuple[str, ...], list[Descriptor]] = {}
    for desc in top:
        groups.setdefault(tuple(desc.names), []).append(desc)
    keys = list(groups)
    chosen_key = keys[_choose([list(k) for k in keys], tag, source)]
    desc = _pick_platform(groups[chosen_key], platform, f"{source} index.json")
    for depth in range(MAX_INDEX_DEPTH + 1):
        if desc.media_type in MANIFEST_TYPES:
            break
        if desc.media_type not in INDEX_TYPES:
            raise UnsupportedError(
                f"{source}: {desc.digest} has media type {desc.media_type!r}, "
                "neither an image index nor an image manifest"
            )
        if depth == MAX_INDEX_DEPTH:
            raise CorruptImageError(f"{source}: image indexes nested too deeply")
        nested = parse_index(read_blob(desc), f"index {desc.digest}")
        desc = _pick_platform(nested, platform, f"index {desc.digest}")
    manifest = parse_manifest(read_blob(desc), desc.media_type, f"manifest {desc.digest}")
    config = parse_config(
        read_blob(manifest.config), len(manifest.layers), f"config {manifest.config.digest}"
    )
    layers = [
        LayerDescriptor(d.digest, diff_id, d.media_type, d.size, blob_path(d.digest))
        for d, diff_id in zip(manifest.layers, config.diff_ids, strict=True)
    ]
    return ImageDescription(kind, list(chosen_key), manifest.config.digest, config.config, layers)


# ------------------------------------------------------------------------------ docker


MemberReader = Callable[[str], bytes]
MediaTypeSniffer = Callable[[str], str]


def describe_docker(
    manifest_data: bytes,
    read_member: MemberReader,
    sniff_media_type: MediaTypeSniffer,
    *,
    tag: str | None,
    source: str,
) -> ImageDescription:
    """Describe an image of a docker save archive (legacy, skopeo, and Docker >= 25).

    Docker's layers carry no media type: like ``docker load``, thinmgr detects their
    compression (``sniff_media_type`` names it). A member name that spells a digest
    (``blobs/sha256/<hex>``) is checked against the config bytes / blob."""
    entries = parse_docker_manifest(manifest_data)
    entry = entries[_choose([e.repo_tags for e in entries], tag, source)]
    config_bytes = read_member(entry.config)
    config_digest = sha256_digest(config_bytes)
    spelled = digest_in_member_name(entry.config)
    if spelled is not None and spelled != config_digest:
        raise CorruptImageError(
            f"{source}: config {entry.config} has digest {config_digest}, not the {spelled} "
            "its name says"
        )
    config = parse_config(config_bytes, len(entry.layers), f"config {entry.config}")
    layers = []
    for name, diff_id in zip(entry.layers, config.diff_ids, strict=True):
        spelled = digest_in_member_name(name)
        # Docker >= 25 names layers by their blob digest; legacy `<id>/layer.tar` names say nothing.
        digest = spelled if name.startswith("blobs/") else None
        layers.append(LayerDescriptor(digest, diff_id, sniff_media_type(name), None, name))
    tags = entry.repo_tags
    return ImageDescription(KIND_DOCKER_ARCHIVE, tags, config_digest, config.config, layers)
