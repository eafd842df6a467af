"""Float64 references: a sequential scan and the materialised semiseparable matrix."""
from ..ir.evaluate import evaluate, to_canonical
from .matrix import attention_matrix, matrix
from .scan import scan

__all__ = ["scan", "matrix", "attention_matrix", "evaluate", "to_canonical"]
