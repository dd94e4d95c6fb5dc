"""Block diffs and layer-diff files (and, later, image layers)."""
