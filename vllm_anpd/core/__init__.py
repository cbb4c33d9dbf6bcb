"""ANPD drafting core: numpy arrays and numba kernels, no vLLM (a test enforces it)."""

from .budget import BatchBudget
from .config import AnpdParams
from .tables import NgramTables

__all__ = ["AnpdParams", "BatchBudget", "NgramTables"]
