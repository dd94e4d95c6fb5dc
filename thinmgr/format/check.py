"""``thin_check`` over a block source: what 0.9.0 checks and what it misses (section 11).

Stages, named as thin_check names them:

1. examining superblock: checksum, self block number, magic, feature flags, block sizes,
   space-map root sanity (``check_superblock``);
2. examining devices tree: the details tree with every node check of section 3.5;
3. examining mapping tree: both levels, devices present in one tree only, ``mapped_blocks``,
   mappings beyond the data device, mapping times later than the superblock's;
4. checking space map counts: expected metadata reference counts (section 5.1) against the
   metadata space map, expected data counts (one per distinct leaf entry) against the data
   space map, overflow trees, summary fields.

A held metadata snapshot is checked with the live metadata: its superblock copy and trees
are walked and counted, as thin_check does. Nothing here raises on bad metadata: every fault
becomes a ``Problem`` and checking goes on where it can.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from thinmgr.errors import NotFoundError, UsageError
from thinmgr.format.blocks import BlockSource
from thinmgr.format.check_refs import SNAPSHOT_SUPERBLOCK, SUPERBLOCK, MetadataRefs
from thinmgr.format.check_report import (
    DEFAULT_OPTIONS,
    CheckOptions,
    CheckReport,
    CheckSummary,
    Problem,
    Problems,
    Severity,
    looks_like_xml,
)
from thinmgr.format.check_spacemap import (
    CountRules,
    LoadedSpaceMap,
    compare_counts,
    load_data_space_map,
    load_metadata_space_map,
)
from thinmgr.format.check_superblock import check_snapshot_copy, check_superblock
from thinmgr.format.check_trees import (
    U64,
    DetailsEntry,
    MappingScan,
    check_details_tree,
    check_mapped_blocks,
    check_mapping_values,
    check_top_level,
    cross_check_devices,
)
from thinmgr.format.constants import NEEDS_CHECK_FLAG
from thinmgr.format.superblock import Superblock

__all__ = [
    "DEFAULT_OPTIONS",
    "CheckOptions",
    "CheckReport",
    "CheckSummary",
    "Problem",
    "Progress",
    "Severity",
    "check_metadata",
    "looks_like_xml",
]

STAGE_SUPERBLOCK = "examining superblock"
STAGE_DEVICES = "examining devices tree"
STAGE_MAPPINGS = "examining mapping tree"
STAGE_SPACE_MAPS = "checking space map counts"

Progress = Callable[[str], None]

SNAP_LABEL = "metadata snapshot: "


class _View:
    """One set of trees to check: the live superblock's or the held snapshot's."""

    def __init__(self, label: str, sb: Superblock) -> None:
        self.label = label
        self.sb = sb
        self.details: dict[int, DetailsEntry] = {}
        self.roots: dict[int, int] = {}
        self.mappings = 0


def check_metadata(
    source: BlockSource,
    options: CheckOptions = DEFAULT_OPTIONS,
    *,
    progress: Progress | None = None,
) -> CheckReport:
    """Check the metadata on ``source``; never raises for bad metadata.

    Raises ``NotFoundError`` when a metadata snapshot is asked for and none is held, and
    ``UsageError`` when the given snapshot block is not the held one (as ``thin_dump -m``).
    """
    report = CheckReport(options)
    problems = Problems()

    def stage(name: str) -> None:
        report.stages.append(name)
        if progress is not None:
            progress(name)

    try:
        _run(source, options, problems, report.summary, stage)
    finally:
        report.problems = problems.listed
        report.counts = problems.counts
    return report


def _run(
    source: BlockSource,
    options: CheckOptions,
    problems: Problems,
    summary: CheckSummary,
    stage: Progress,
) -> None:
    stage(STAGE_SUPERBLOCK)
    sb = check_superblock(source, problems)
    if sb is None:
        return
    _fill_superblock_summary(sb, summary, options)
    refs = MetadataRefs(problems)
    refs.reference(0, SUPERBLOCK)
    views = _views(source, sb, options, refs, problems)
    if options.super_block_only or not views:
        return

    stage(STAGE_DEVICES)
    for view in views:
        view.details = check_details_tree(
            source, view.sb.device_details_root, view.label, refs, problems
        )
    summary.devices = len(views[0].details)

    stage(STAGE_MAPPINGS)
    fatal_before_mappings = problems.counts[Severity.FATAL]
    scan = MappingScan(source, refs, problems)
    for view in views:
        view.roots = check_top_level(source, view.sb.data_mapping_root, view.label, refs, problems)
        cross_check_devices(
            view.details,
            view.roots,
            view.label,
            details_root=view.sb.device_details_root,
            mapping_root=view.sb.data_mapping_root,
            problems=problems,
        )
        if options.skip_mappings:
            continue
        for dev in sorted(view.roots):
            scan.walk_device(dev, view.roots[dev], view.label)
    if options.skip_mappings:
        return
    # Unreadable nodes: their mappings are missing from the expected data counts.
    mappings_damaged = problems.counts[Severity.FATAL] > fatal_before_mappings
    for view in views:
        view.mappings = check_mapped_blocks(view.details, view.roots, view.label, scan, problems)
    summary.mappings = views[0].mappings
    values, leaf_of = scan.arrays()
    live = options.metadata_snap is False
    # A snapshot has no space maps, so the data device size is unknown (thin_dump -m
    # prints nr_data_blocks="0").
    nr_data = sb.data_sm.nr_blocks if live else None
    data_blocks = check_mapping_values(values, leaf_of, nr_data, sb.time, problems)
    del values, leaf_of
    if not live:
        return  # thin_check -m checks no space maps (section 7.3)

    stage(STAGE_SPACE_MAPS)
    metadata_sm = load_metadata_space_map(source, sb.metadata_sm, refs, problems)
    data_sm = load_data_space_map(source, sb.data_sm, refs, problems)
    if metadata_sm is not None:
        blocks, counts = refs.as_arrays()
        compare_counts(
            source, metadata_sm, blocks, counts, rules=CountRules(True, refs), problems=problems
        )
    if data_sm is not None:
        _compare_data_counts(
            source, data_sm, data_blocks, problems, mappings_damaged=mappings_damaged
        )


def _fill_superblock_summary(sb: Superblock, summary: CheckSummary, options: CheckOptions) -> None:
    summary.transaction_id = sb.trans_id
    summary.time = sb.time
    summary.needs_check = bool(sb.flags & NEEDS_CHECK_FLAG)
    summary.metadata_snap = sb.held_root or None
    if options.metadata_snap is False:
        # As thin_check 1.x prints METADATA_FREE_BLOCKS: from the space-map root.
        summary.metadata_blocks = sb.metadata_sm.nr_blocks
        summary.metadata_blocks_free = max(
            0, sb.metadata_sm.nr_blocks - sb.metadata_sm.nr_allocated
        )
        summary.data_blocks = sb.data_sm.nr_blocks
        summary.data_blocks_free = max(0, sb.data_sm.nr_blocks - sb.data_sm.nr_allocated)


def _views(
    source: BlockSource,
    sb: Superblock,
    options: CheckOptions,
    refs: MetadataRefs,
    problems: Problems,
) -> list[_View]:
    """The trees to walk: live (plus the held snapshot's), or only the held snapshot's."""
    held = sb.held_root
    if options.metadata_snap is not False:
        if held == 0:
            raise NotFoundError(
                "no metadata snapshot found: the superblock holds none",
                hint="Drop --metadata-snap to check the live metadata.",
            )
        if options.metadata_snap is not True and options.metadata_snap != held:
            raise UsageError(
                f"--metadata-snap={options.metadata_snap} does not match the "
                f"held metadata snapshot at block {held}",
                hint=f"Use --metadata-snap={held} or plain --metadata-snap.",
            )
        snap = check_snapshot_copy(source, held, problems)
        return [] if snap is None else [_View("", snap)]
    views = [_View("", sb)]
    if held and refs.reference(held, SNAPSHOT_SUPERBLOCK):
        snap = check_snapshot_copy(source, held, problems)
        if snap is not None:
            views.append(_View(SNAP_LABEL, snap))
    return views


def _compare_data_counts(
    source: BlockSource,
    data_sm: LoadedSpaceMap,
    data_blocks: U64,
    problems: Problems,
    *,
    mappings_damaged: bool,
) -> None:
    """Data counts: one per mapping in each distinct bottom-level leaf (section 5.1)."""
    blocks, counts = np.unique(data_blocks, return_counts=True)
    compare_counts(
        source,
        data_sm,
        blocks.astype(np.uint64),
        counts.astype(np.uint32),
        rules=CountRules(False, mappings_damaged=mappings_damaged),
        problems=problems,
    )
