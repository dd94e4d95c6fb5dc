"""The only package that talks to the kernel through ioctl, ctypes and mount syscalls.

Kernel names (``LOOP_CONFIGURE``, ``fuse_in_header``) stay at this boundary; the layers above
use the domain's names. Kernel errors leave this package as ``ThinmgrError``s.
"""
