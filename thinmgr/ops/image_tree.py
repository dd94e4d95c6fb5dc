"""`thinmgr image tree`: a pool's layers as the forest their parent links make. Pure.

Each node is a layer with the images whose top it is and the space its device uses, as
``thin_ls`` counts it (format/ls.py): MAPPED (every block the device maps), EXCLUSIVE (blocks
no other device of the pool maps) and SHARED (the rest: blocks held in common with the layer's
parent, its children, containers or other snapshots). A layer shared by two images appears
once, with both images' children below it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LayerFacts:
    """What the tree needs of one layer (from the catalog)."""

    id: int
    parent_id: int | None
    chain_id: str
    diff_id: str
    device: str
    thin_id: int
    size_bytes: int


@dataclass(frozen=True)
class Usage:
    """A device's space in bytes (from the pool metadata, like thin_ls)."""

    mapped: int
    exclusive: int

    @property
    def shared(self) -> int:
        return self.mapped - self.exclusive


@dataclass
class TreeNode:
    layer: LayerFacts
    images: list[str]
    usage: Usage | None
    children: list[TreeNode] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        u = self.usage
        return {
            "chain_id": self.layer.chain_id,
            "diff_id": self.layer.diff_id,
            "device": self.layer.device,
            "thin_id": self.layer.thin_id,
            "size_bytes": self.layer.size_bytes,
            "images": list(self.images),
            "mapped_bytes": None if u is None else u.mapped,
            "exclusive_bytes": None if u is None else u.exclusive,
            "shared_bytes": None if u is None else u.shared,
            "children": [child.as_dict() for child in self.children],
        }


def build_forest(
    layers: Iterable[LayerFacts],
    tops: Mapping[int, list[str]],
    usage: Mapping[int, Usage],
) -> list[TreeNode]:
    """The layers as trees, roots first; ``tops`` maps a layer id to the images ("name:tag")
    whose top it is, ``usage`` a thin id to its space. Siblings are ordered by chain id so
    that the output is stable. A layer whose parent is missing (a damaged catalog) is shown
    as a root rather than dropped."""
    facts = {layer.id: layer for layer in layers}
    nodes = {
        lid: TreeNode(f, sorted(tops.get(lid, [])), usage.get(f.thin_id))
        for lid, f in facts.items()
    }
    roots: list[TreeNode] = []
    for lid, node in nodes.items():
        parent = facts[lid].parent_id
        if parent is not None and parent in nodes:
            nodes[parent].children.append(node)
        else:
            roots.append(node)
    for node in nodes.values():
        node.children.sort(key=lambda n: n.layer.chain_id)
    roots.sort(key=lambda n: n.layer.chain_id)
    return roots


def walk(roots: Iterable[TreeNode], depth: int = 0) -> Iterable[tuple[int, TreeNode]]:
    """Every node with its depth, parents before children."""
    for node in roots:
        yield depth, node
        yield from walk(node.children, depth + 1)
