"""Masked GPU kernels: pruned attention heads and FFN channels cost nothing.

Triton kernels (attention.py, linear.py) with exact pure-torch twins (reference.py);
the entry points below check inputs and choose the backend (see dispatch.py for the
signatures and shapes). Importing this package never imports triton.
"""

from headlab.kernels.backend import Backend, interpreter_enabled, triton_available
from headlab.kernels.compact import HeadKeep, KeepIndex
from headlab.kernels.dispatch import (
    col_sparse_linear,
    grouped_col_sparse_linear,
    grouped_row_sparse_linear,
    head_sparse_attention,
    row_sparse_linear,
)
from headlab.kernels.indices import PAD_INDEX, head_features, keep_indices, pad_keep_indices, scatter_columns

__all__ = [
    "PAD_INDEX",
    "Backend",
    "HeadKeep",
    "KeepIndex",
    "col_sparse_linear",
    "grouped_col_sparse_linear",
    "grouped_row_sparse_linear",
    "head_features",
    "head_sparse_attention",
    "interpreter_enabled",
    "keep_indices",
    "pad_keep_indices",
    "row_sparse_linear",
    "scatter_columns",
    "triton_available",
]
