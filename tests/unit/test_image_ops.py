"""Pure parts of the image use cases: references, chain ids of commits, the layer tree."""

from __future__ import annotations

import hashlib

import pytest

from thinmgr.errors import UsageError
from thinmgr.ops.commit import next_chain_id
from thinmgr.ops.image_refs import ImageRef, parse_ref
from thinmgr.ops.image_tree import LayerFacts, Usage, build_forest, walk
from thinmgr.ops.images import synthetic_config_digest
from thinmgr.ops.layer_store import layer_device_name


@pytest.mark.parametrize(
    ("text", "name", "tag"),
    [
        ("busybox", "busybox", "latest"),
        ("busybox:1.36", "busybox", "1.36"),
        ("library/busybox:musl_x", "library/busybox", "musl_x"),
        ("localhost:5000/app", "localhost:5000/app", "latest"),
        ("localhost:5000/app:v2", "localhost:5000/app", "v2"),
        ("Registry.Example.com/a-b__c.d/e", "Registry.Example.com/a-b__c.d/e", "latest"),
    ],
)
def test_refs_parse_like_docker(text: str, name: str, tag: str) -> None:
    assert parse_ref(text) == ImageRef(name, tag)
    assert str(parse_ref(text)) == f"{name}:{tag}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("BusyBox", "uppercase"),
        ("busybox:", "empty tag"),
        ("busybox:.x", "not a valid tag"),
        ("busybox@sha256:" + "0" * 64, "digest"),
        ("a//b", "not a valid image name"),
        ("-a", "not a valid image name"),
        ("a:" + "t" * 129, "not a valid tag"),
        ("x" * 256, "characters"),
        ("../etc", "not a valid image name"),
    ],
)
def test_bad_refs_say_why(text: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_ref(text)


def test_commit_chain_id_follows_the_oci_rule() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert next_chain_id(None, a) == a
    expected = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert next_chain_id(a, b) == expected


def test_layer_device_names_and_synthetic_digests() -> None:
    assert layer_device_name("sha256:0123456789abcdef") == "layer-0123456789ab"
    one = synthetic_config_digest({"Cmd": ["/bin/sh"]}, ["sha256:1"])
    assert one.startswith("sha256:") and len(one) == 71
    assert one == synthetic_config_digest({"Cmd": ["/bin/sh"]}, ["sha256:1"])
    assert one != synthetic_config_digest({"Cmd": ["/bin/sh"]}, ["sha256:2"])


def _facts(lid: int, parent: int | None, chain: str, thin: int) -> LayerFacts:
    return LayerFacts(lid, parent, chain, "sha256:d", f"layer-{chain}", thin, 10)


def test_forest_shares_a_common_bottom_once() -> None:
    # base <- top1 (image a), base <- top2 (image b), orphan with a missing parent
    layers = [
        _facts(2, 1, "c2", 12),
        _facts(1, None, "c1", 11),
        _facts(3, 1, "c3", 13),
        _facts(9, 42, "c9", 19),
    ]
    usage = {11: Usage(100, 40), 12: Usage(110, 10)}
    roots = build_forest(layers, {2: ["a:latest"], 3: ["b:1", "b:0"]}, usage)
    assert [r.layer.chain_id for r in roots] == ["c1", "c9"]
    base = roots[0]
    assert [c.layer.chain_id for c in base.children] == ["c2", "c3"]
    assert base.children[1].images == ["b:0", "b:1"]
    assert base.usage is not None and base.usage.shared == 60
    assert base.children[1].usage is None
    order = [(depth, node.layer.id) for depth, node in walk(roots)]
    assert order == [(0, 1), (1, 2), (1, 3), (0, 9)]
    data = base.as_dict()
    assert data["exclusive_bytes"] == 40 and data["children"][0]["images"] == ["a:latest"]
    assert data["children"][1]["mapped_bytes"] is None


def test_commit_chain_ids_agree_with_the_import_side() -> None:
    from thinmgr.layers.image_formats import chain_ids

    diffs = ["sha256:" + c * 64 for c in "abc"]
    chain: str | None = None
    ours = []
    for diff in diffs:
        chain = next_chain_id(chain, diff)
        ours.append(chain)
    assert ours == chain_ids(diffs)
