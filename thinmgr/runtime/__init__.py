"""Launch plans for containers: namespaces, mounts, cgroups, capabilities and seccomp."""
