"""Data sets, shards and loaders."""
