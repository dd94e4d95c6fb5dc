"""Generate thin_dump-style XML for fixtures: thin_restore turns it into real metadata.

Mappings are drawn from a seeded generator so that each fixture is reproducible: runs of
random length at random data blocks, so that leaves hold both range and single mappings.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Device:
    dev_id: int
    transaction: int = 0
    creation_time: int = 0
    snap_time: int = 0
    # (origin_begin, data_begin, length, time)
    runs: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def mapped(self) -> int:
        return sum(r[2] for r in self.runs)


@dataclass
class Pool:
    devices: list[Device]
    nr_data_blocks: int
    time: int = 1
    transaction: int = 1
    data_block_size: int = 128
    flags: int = 0
    version: int = 2

    def xml(self) -> str:
        out = [
            f'<superblock uuid="" time="{self.time}" transaction="{self.transaction}" '
            f'flags="{self.flags}" version="{self.version}" '
            f'data_block_size="{self.data_block_size}" '
            f'nr_data_blocks="{self.nr_data_blocks}">\n'
        ]
        for d in sorted(self.devices, key=lambda d: d.dev_id):
            out.append(
                f'  <device dev_id="{d.dev_id}" mapped_blocks="{d.mapped}" '
                f'transaction="{d.transaction}" creation_time="{d.creation_time}" '
                f'snap_time="{d.snap_time}">\n'
            )
            for v, b, n, t in d.runs:
                if n == 1:
                    out.append(
                        f'    <single_mapping origin_block="{v}" data_block="{b}" time="{t}"/>\n'
                    )
                else:
                    out.append(
                        f'    <range_mapping origin_begin="{v}" data_begin="{b}" '
                        f'length="{n}" time="{t}"/>\n'
                    )
            out.append("  </device>\n")
        out.append("</superblock>\n")
        return "".join(out)


def random_pool(
    seed: int,
    nr_devices: int,
    mappings_per_device: int,
    *,
    max_run: int = 8,
    share: float = 0.5,
    max_time: int = 3,
) -> Pool:
    """Devices whose mappings overlap: later devices reuse a share of device 0's data blocks,
    as snapshots do, so that data blocks have reference counts above one."""
    rng = random.Random(seed)
    total = nr_devices * mappings_per_device
    nr_data = total + total // 4 + 16
    free = list(range(nr_data))
    rng.shuffle(free)
    base: list[tuple[int, int, int, int]] = []
    devices = []
    for i in range(nr_devices):
        dev = Device(
            dev_id=i * 3 + (7 if i % 2 else 0),
            transaction=i,
            creation_time=min(i, max_time),
            snap_time=min(i + 1, max_time),
        )
        vblock = rng.randrange(0, 50)
        mapped = 0
        base_iter = iter(base)
        while mapped < mappings_per_device:
            n = min(rng.randint(1, max_run), mappings_per_device - mapped)
            shared = next(base_iter, None) if i and rng.random() < share else None
            if shared is not None:
                n = min(shared[2], mappings_per_device - mapped)
                dev.runs.append((vblock, shared[1], n, shared[3]))
            else:
                start = free.pop()
                # extend the run on consecutive free data blocks where the shuffle allows
                run = [start]
                while len(run) < n and free and free[-1] == run[-1] + 1:
                    run.append(free.pop())
                n = len(run)
                dev.runs.append((vblock, start, n, rng.randint(0, max_time)))
            mapped += n
            vblock += n + (rng.randrange(1, 20) if rng.random() < 0.3 else 0)
        if i == 0:
            base = dev.runs
        devices.append(dev)
    return Pool(devices=devices, nr_data_blocks=nr_data, time=max_time, transaction=nr_devices)
