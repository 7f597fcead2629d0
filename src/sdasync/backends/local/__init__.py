"""Backends that keep their data on the local filesystem."""
