"""Block diff against thin_delta, and layer-diff file size against the changed data.

Builds pool metadata (``restore_to_image`` with 1.x ``<def>``/``<ref>`` shared leaves, as a
snapshot shares its origin's leaves until written) where device 1 is a snapshot of device 0
with 1,000 random blocks written since; then times, on the same metadata file:

    diff (compute_delta, changed_only, XML rendered)  vs  thin_delta --snap1 0 --snap2 1
        goal: >= 10x faster at 1,000,000 mapped blocks
    the same 1,000 changes on a device 4x larger
        goal: <= 1.3x the time at 1,000,000

Ours is timed both in-process (the walk, as `thinmgr diff` runs it) and end to end in a
fresh interpreter (start-up and imports included, as a user runs it). Then a layer-diff
file of the 1,000 changed blocks (half random, half zero bytes each) is written and its size
compared with the changed data.

Usage: python3 benchmarks/diff.py [--blocks N] [--changes C] [--runs R]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import save_result, time_call, time_command
from thinmgr.format.delta import compute_delta, delta_xml
from thinmgr.format.metadata import ThinMetadata
from thinmgr.format.restore import restore_to_image
from thinmgr.layers.diff_format import LayerHeader, LayerWriter
from thinmgr.ops.sources import MetadataFile

BLOCK_SECTORS = 128
BLOCK_BYTES = BLOCK_SECTORS * 512


def snapshot_xml(blocks: int, changed: list[int]) -> str:
    """Device 0 maps 0..blocks-1 to the same data blocks; device 1 shares everything but
    ``changed`` (written after the snapshot, so newly allocated data blocks)."""
    defs: list[str] = []
    refs: list[str] = []
    origin_own: dict[int, str] = {}
    snap_own: dict[int, str] = {}
    start = 0
    for i, block in enumerate([*changed, blocks]):
        if block > start:
            name = f"s{i}"
            defs.append(
                f'<def name="{name}"><range_mapping origin_begin="{start}" '
                f'data_begin="{start}" length="{block - start}" time="0"/></def>'
            )
            refs.append(f'<ref name="{name}"/>')
        if block < blocks:
            origin_own[len(refs)] = (
                f'<single_mapping origin_block="{block}" data_block="{block}" time="0"/>'
            )
            snap_own[len(refs)] = (
                f'<single_mapping origin_block="{block}" data_block="{blocks + i}" time="1"/>'
            )
            refs.append("")
        start = block + 1

    def device(dev: int, own: dict[int, str]) -> str:
        body = "".join(own.get(i, r) for i, r in enumerate(refs))
        return (
            f'<device dev_id="{dev}" mapped_blocks="{blocks}" transaction="0" '
            f'creation_time="0" snap_time="1">{body}</device>'
        )

    return (
        f'<superblock uuid="" time="1" transaction="1" version="2" '
        f'data_block_size="{BLOCK_SECTORS}" nr_data_blocks="{blocks + len(changed)}">'
        + "".join(defs)
        + device(0, origin_own)
        + device(1, snap_own)
        + "</superblock>\n"
    )


def ours(path: Path) -> int:
    with MetadataFile(str(path)) as source:
        md = ThinMetadata(source)
        delta = compute_delta(md, 0, 1, changed_only=True)
        return sum(len(chunk) for chunk in delta_xml(md, delta))


ONE_SHOT = (
    "import sys; sys.path.insert(0, {root!r}); from benchmarks.diff import ours; "
    "from pathlib import Path; ours(Path({path!r}))"
)


def measure(work: Path, blocks: int, changed: list[int], runs: int) -> dict[str, float]:
    path = work / f"meta-{blocks}.bin"
    nr_meta = max(4096, blocks // 40)  # ~ 1 metadata block per 126 mappings, and room
    path.write_bytes(restore_to_image(snapshot_xml(blocks, changed), nr_meta))
    inproc = time_call(f"diff {blocks}", lambda: ours(path), runs)
    root = str(Path(__file__).resolve().parent.parent)
    script = ONE_SHOT.format(root=root, path=str(path))
    oneshot = time_command([sys.executable, "-c", script], runs)
    theirs = time_command(["thin_delta", "--snap1", "0", "--snap2", "1", str(path)], runs)
    path.unlink()
    return {
        "blocks": blocks,
        "ours_inprocess_s": inproc.median,
        "ours_end_to_end_s": oneshot.median,
        "thin_delta_s": theirs.median,
    }


def layer_size(changed: list[int], blocks: int) -> dict[str, float]:
    rng = random.Random(7)
    out = io.BytesIO()
    data_bytes = len(changed) * BLOCK_BYTES
    writer = LayerWriter(out, LayerHeader(BLOCK_BYTES, blocks * BLOCK_BYTES, data_bytes, None))
    for block in changed:
        half = BLOCK_BYTES // 2
        writer.data(block, 1, [rng.randbytes(half) + bytes(half)])
    writer.finish()
    return {"changed_bytes": data_bytes, "file_bytes": len(out.getvalue())}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=1_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    changed = sorted(random.Random(1).sample(range(args.blocks), args.changes))
    with tempfile.TemporaryDirectory(prefix="thinmgr-bench-") as tmp:
        small = measure(Path(tmp), args.blocks, changed, args.runs)
        large = measure(Path(tmp), 4 * args.blocks, changed, args.runs)
    size = layer_size(changed, args.blocks)
    speedup = small["thin_delta_s"] / small["ours_inprocess_s"]
    speedup_e2e = small["thin_delta_s"] / small["ours_end_to_end_s"]
    growth = large["ours_inprocess_s"] / small["ours_inprocess_s"]
    print(f"{'':28}{'1x':>12}{'4x':>12}")
    for key in ("ours_inprocess_s", "ours_end_to_end_s", "thin_delta_s"):
        print(f"{key:28}{small[key] * 1000:>10.1f}ms{large[key] * 1000:>10.1f}ms")
    print(f"speed-up vs thin_delta (in-process): {speedup:.1f}x (goal >= 10x)")
    print(f"speed-up vs thin_delta (end to end): {speedup_e2e:.1f}x")
    print(f"4x larger device: {growth:.2f}x the time (goal <= 1.3x)")
    ratio = size["file_bytes"] / size["changed_bytes"]
    print(
        f"layer-diff file: {size['file_bytes']} bytes for {size['changed_bytes']} changed "
        f"bytes ({ratio:.3f}; blocks half random, half zeros)"
    )
    saved = save_result(
        "diff",
        {"small": small, "large": large, "layer": size, "speedup": speedup, "growth": growth},
    )
    print(f"saved {saved}")
    return 0 if speedup >= 10 and growth <= 1.3 else 1


if __name__ == "__main__":
    sys.exit(main())
