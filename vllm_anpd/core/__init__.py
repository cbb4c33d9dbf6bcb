"""ANPD drafting core: numpy arrays and numba kernels, no vLLM (a test enforces it)."""

from .config import AnpdParams
from .tables import NgramTables

__all__ = ["AnpdParams", "NgramTables"]
