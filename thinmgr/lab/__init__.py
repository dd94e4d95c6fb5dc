"""The kernel lab: boot a Debian kernel with dm-thin under qemu (TCG) and run commands in it.

The development and CI machines have no device-mapper, so everything that needs a real
dm-thin pool runs in this guest. Design and measurements: shared/design/kernel-lab.md;
usage: docs/kernel-lab.md.

Modules, one job each: ``cache`` (where the prepared kernel lives), ``debpkg`` (read .deb
archives), ``kernel`` (fetch and extract), ``modinfo`` (module load order), ``cpio`` (newc
writer), ``initramfs`` (the guest's initramfs), ``guest_init`` (its /init script),
``qemu`` (the command line), ``console`` (marker parsing), ``vm`` (run qemu with a timeout),
``session`` (one full run: results dir, run script, exit code), ``junit`` (map the guest's
pytest results back to host test ids).
"""
