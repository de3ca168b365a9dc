"""Torch utilities: misc helpers, training stats, snapshots, custom ops."""
