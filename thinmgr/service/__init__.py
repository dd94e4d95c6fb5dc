"""The command service: a resident process that has thinmgr imported and forks a worker for
each command a thin client hands it (`thinmgr service start`; docs/service.md)."""
