"""Figures from a run: attention maps, reconstructions (matplotlib, written as PNG)."""
