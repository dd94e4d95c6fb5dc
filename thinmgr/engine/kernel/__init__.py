"""The kernel engine: pools and volumes served by the kernel's dm-thin targets."""
