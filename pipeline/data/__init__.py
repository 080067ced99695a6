"""Shard readers and writers, URL lists, packing and loaders."""
