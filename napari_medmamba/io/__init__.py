"""Scan input/output with exact geometry (Qt-free)."""

from .volume import DicomInfo, Geometry, Volume

__all__ = ["DicomInfo", "Geometry", "Volume"]
