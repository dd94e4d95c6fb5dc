"""Engines: what actually serves pools and volumes (kernel dm-thin or the user engine)."""
