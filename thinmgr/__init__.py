"""thinmgr: a thin-provisioning block storage manager for Linux."""

__version__ = "0.1.0"
