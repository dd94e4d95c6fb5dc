"""Image format parsing (thinmgr.layers.image_formats): pure, no root, no files."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.images import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    digest,
    docker_files,
    image_config,
    oci_files,
)
from thinmgr.errors import CorruptImageError, NotFoundError, UnsupportedError, UsageError
from thinmgr.layers.image_formats import (
    Compression,
    Descriptor,
    chain_ids,
    check_digest,
    describe_docker,
    describe_oci,
    layer_compression,
    parse_config,
    parse_docker_manifest,
    parse_index,
    parse_manifest,
    tag_matches,
)

A, B, C = ("sha256:" + ch * 64 for ch in "abc")
LAYERS = [b"layer-one-bytes", b"layer-two-bytes"]
CONFIG = {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}


def blob_reader(files: dict[str, bytes]) -> Any:
    def read(desc: Descriptor) -> bytes:
        data = files[f"blobs/sha256/{desc.digest.split(':')[1]}"]
        assert digest(data) == desc.digest
        return data

    return read


def describe(files: dict[str, bytes], tag: str | None = None) -> Any:
    return describe_oci(
        files["index.json"], blob_reader(files), kind="oci-layout", tag=tag, source="test"
    )


# ------------------------------------------------------------------------------ chain ids


def test_chain_ids_match_hand_computed_values() -> None:
    # sha256("sha256:aaa…a sha256:bbb…b") and sha256(<that> + " sha256:ccc…c"), computed by hand.
    assert chain_ids([A, B, C]) == [
        A,
        "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c",
        "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588",
    ]
    assert chain_ids([]) == []


def test_chain_ids_refuse_bad_digests() -> None:
    with pytest.raises(CorruptImageError):
        chain_ids([A, "sha256:xyz"])


# ------------------------------------------------------------------------------ digests


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:",
        "sha256:" + "a" * 63,
        "sha256:" + "A" * 64,
        "sha256:" + "g" * 64,
        "a" * 64,
        "sha256:" + "a" * 65,
        42,
        None,
        "sha256:" + "a" * 64 + "\n",
    ],
)
def test_malformed_digests_are_corrupt(bad: object) -> None:
    with pytest.raises(CorruptImageError, match="digest"):
        check_digest(bad, "layer")


def test_other_digest_algorithms_are_refused_clearly() -> None:
    with pytest.raises(UnsupportedError, match="'sha512' is not supported"):
        check_digest("sha512:" + "a" * 128, "layer")
    assert check_digest(A, "x") == A


# ------------------------------------------------------------------------------ media types


def test_layer_media_types_decide_compression() -> None:
    assert layer_compression("application/vnd.oci.image.layer.v1.tar") is Compression.NONE
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+gzip") is Compression.GZIP
    assert layer_compression("application/vnd.oci.image.layer.v1.tar+zstd") is Compression.ZSTD
    docker = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert layer_compression(docker) is Compression.GZIP
    with pytest.raises(UnsupportedError, match="not supported"):
        layer_compression("application/vnd.oci.image.layer.v1.tar+lz4")


def manifest_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": A, "size": 10},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": B, "size": 5}],
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def test_manifest_without_media_type_is_accepted_like_umoci_writes_it() -> None:
    manifest = parse_manifest(json.dumps(manifest_doc(mediaType=None)).encode(), OCI_MANIFEST, "m")
    assert manifest.config.digest == A
    assert [layer.digest for layer in manifest.layers] == [B]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mediaType": OCI_INDEX}, "not an image manifest"),
        ({"mediaType": "application/vnd.docker.distribution.manifest.v2+json"}, "differs"),
        ({"manifests": []}, "must not have 'manifests'"),
        (
            {
                "config": {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": A,
                    "size": 1,
                }
            },
            "not an image config",
        ),
        ({"config": {"mediaType": "application/json", "digest": A, "size": 1}}, "image config"),
        ({"layers": None}, "no 'layers'"),
    ],
)
def test_media_type_confusion_is_refused(changes: dict[str, Any], message: str) -> None:
    # CVE-2021-41190: a document must be what the descriptor pointing at it says it is.
    with pytest.raises(CorruptImageError, match=message):
        parse_manifest(json.dumps(manifest_doc(**changes)).encode(), OCI_MANIFEST, "m")


def test_unknown_layer_type_in_manifest_is_unsupported() -> None:
    layers = [{"mediaType": "application/x-rar", "digest": B, "size": 5}]
    with pytest.raises(UnsupportedError):
        parse_manifest(json.dumps(manifest_doc(layers=layers)).encode(), OCI_MANIFEST, "m")


def test_index_that_looks_like_a_manifest_is_refused() -> None:
    doc = {"schemaVersion": 2, "manifests": [], "layers": []}
    with pytest.raises(CorruptImageError, match="must not have"):
        parse_index(json.dumps(doc).encode())
    with pytest.raises(CorruptImageError, match="not an image index"):
        parse_index(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "manifests": []}).encode()
        )
    with pytest.raises(UnsupportedError, match="schemaVersion"):
        parse_index(json.dumps({"schemaVersion": 1, "manifests": []}).encode())
    with pytest.raises(CorruptImageError, match="not valid JSON"):
        parse_index(b"{not json")


# ------------------------------------------------------------------------------ config


def test_config_diff_ids_must_match_the_layer_count() -> None:
    data = json.dumps(image_config(LAYERS, CONFIG)).encode()
    parsed = parse_config(data, 2)
    assert parsed.diff_ids == [digest(layer) for layer in LAYERS]
    assert parsed.config == CONFIG
    with pytest.raises(CorruptImageError, match="names 2 diff_ids but the manifest has 3"):
        parse_config(data, 3)


def test_config_without_config_section_gives_empty_settings() -> None:
    doc = {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [A]}}
    assert parse_config(json.dumps(doc).encode(), 1).config == {}


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"rootfs": {"type": "layers", "diff_ids": ["sha256:00"]}}, CorruptImageError),
        ({"rootfs": {"type": "bogus", "diff_ids": [A]}}, CorruptImageError),
        ({"rootfs": {"type": "layers"}}, CorruptImageError),
        ({"os": "windows", "rootfs": {"type": "layers", "diff_ids": [A]}}, UnsupportedError),
        ({"rootfs": {"type": "layers", "diff_ids": [A]}, "config": []}, CorruptImageError),
        ([1, 2], CorruptImageError),
    ],
)
def test_bad_configs_are_refused(doc: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_config(json.dumps(doc).encode(), 1)


# ------------------------------------------------------------------------------ OCI index


def test_oci_layout_description() -> None:
    files = oci_files(LAYERS, CONFIG, tag="v1", compress_with="gzip")
    desc = describe(files)
    assert desc.kind == "oci-layout"
    assert desc.tags == ["v1"]
    assert desc.config == CONFIG
    assert [layer.diff_id for layer in desc.layers] == [digest(layer) for layer in LAYERS]
    assert all(layer.media_type.endswith("+gzip") for layer in desc.layers)
    for layer in desc.layers:
        assert layer.digest is not None
        assert layer.location == f"blobs/sha256/{layer.digest.split(':')[1]}"
        assert files[layer.location] and len(files[layer.location]) == layer.size


def test_nested_index_picks_linux_amd64() -> None:
    files = oci_files(LAYERS, CONFIG, nested=True, compress_with="zstd")
    desc = describe(files, tag="latest")
    assert [layer.diff_id for layer in desc.layers] == [digest(layer) for layer in LAYERS]
    with pytest.raises(UnsupportedError, match="no linux/s390x image"):
        describe_oci(
            files["index.json"],
            blob_reader(files),
            kind="oci-layout",
            tag=None,
            source="t",
            platform=("linux", "s390x"),
        )


def test_several_images_need_a_tag() -> None:
    other = oci_files([b"x"], CONFIG, tag="v2")
    top = json.loads(other["index.json"])["manifests"][0]
    files = oci_files(LAYERS, CONFIG, tag="v1", extra_index=[top])
    files.update({k: v for k, v in other.items() if k.startswith("blobs/")})
    with pytest.raises(UsageError, match="holds 2 images") as info:
        describe(files)
    assert "v1, v2" in (info.value.hint or "")
    assert len(describe(files, tag="v2").layers) == 1
    assert len(describe(files, tag="busybox:v1").layers) == 2
    with pytest.raises(NotFoundError, match="no image tagged 'v3'"):
        describe(files, tag="v3")


def test_manifest_media_type_must_match_its_descriptor() -> None:
    files = oci_files(LAYERS, CONFIG)
    index = json.loads(files["index.json"])
    index["manifests"][0]["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"
    files["index.json"] = json.dumps(index).encode()
    with pytest.raises(CorruptImageError, match="differs from the descriptor"):
        describe(files)


# ------------------------------------------------------------------------------ docker


def docker_description(legacy: bool, tag: str | None = None) -> Any:
    files, links = docker_files(
        LAYERS, CONFIG, repo_tag="docker.io/library/busybox:1.36", legacy=legacy
    )

    def read_member(name: str) -> bytes:
        return files[name]

    return (
        describe_docker(
            files["manifest.json"],
            read_member,
            lambda name: "application/vnd.oci.image.layer.v1.tar",
            tag=tag,
            source="t",
        ),
        files,
        links,
    )


def test_docker_legacy_manifest() -> None:
    desc, files, links = docker_description(legacy=True)
    assert desc.kind == "docker-archive"
    assert desc.tags == ["docker.io/library/busybox:1.36"]
    assert desc.config == CONFIG
    assert [layer.digest for layer in desc.layers] == [None, None]  # `<id>/layer.tar` says nothing
    assert [layer.diff_id for layer in desc.layers] == [digest(layer) for layer in LAYERS]
    assert all(layer.location in links for layer in desc.layers)  # skopeo's symlinks
    assert desc.config_digest == digest(files[json.loads(files["manifest.json"])[0]["Config"]])


def test_docker_25_manifest_names_blobs_by_digest() -> None:
    desc, _, _ = docker_description(legacy=False, tag="busybox:1.36")
    assert [layer.digest for layer in desc.layers] == [digest(layer) for layer in LAYERS]
    assert [layer.location for layer in desc.layers] == [
        f"blobs/sha256/{digest(layer).split(':')[1]}" for layer in LAYERS
    ]
    with pytest.raises(NotFoundError):
        docker_description(legacy=False, tag="busybox:latest")


def test_docker_manifest_shape_is_checked() -> None:
    for bad in (b"{}", b"[]", b'[{"Layers": []}]', b'[{"Config": "c.json", "Layers": [1]}]'):
        with pytest.raises(CorruptImageError):
            parse_docker_manifest(bad)


def test_docker_config_name_must_match_its_digest() -> None:
    files, _ = docker_files(LAYERS, CONFIG, legacy=False)
    manifest = json.loads(files["manifest.json"])
    tampered = json.dumps(image_config(LAYERS, {"Cmd": ["/bin/evil"]})).encode()
    files[manifest[0]["Config"]] = tampered
    with pytest.raises(CorruptImageError, match="its name says"):
        describe_docker(
            files["manifest.json"], files.__getitem__, lambda n: "x", tag=None, source="t"
        )


def test_tag_matching() -> None:
    assert tag_matches("docker.io/library/busybox:latest", "busybox")
    assert tag_matches("busybox:latest", "docker.io/library/busybox:latest")
    assert tag_matches("latest", "busybox:latest")
    assert tag_matches("latest", "latest")
    assert not tag_matches("busybox:1.36", "busybox")
    assert not tag_matches("alpine:latest", "busybox:latest")
