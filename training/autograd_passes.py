"""Marks the passes whose graph is differentiated twice, for layers that have a faster path without a double backward.

The loss opens ``double_backward()`` around D's R1 pass and G's path-length pass: those take the gradient of a
gradient. A hook layer with a fast path that autograd cannot differentiate twice (the fused attention kernels,
``training.attention.SelfAttention``) asks ``double_backward_needed()`` and takes its twice-differentiable path
inside. This module holds only that state, so the networks, the loss and the hooks can all import it without
importing each other.
"""

import contextlib

_DOUBLE_BACKWARD_DEPTH = [0]            # Open double_backward() contexts (they may nest).


@contextlib.contextmanager
def double_backward():
    """Marks a pass whose graph will be differentiated twice (R1, path length). Hook layers that have a fast
    path without a double backward (fused attention kernels) take their differentiable-twice path inside it."""
    _DOUBLE_BACKWARD_DEPTH[0] += 1
    try:
        yield
    finally:
        _DOUBLE_BACKWARD_DEPTH[0] -= 1


def double_backward_needed() -> bool:
    """True inside double_backward()."""
    return _DOUBLE_BACKWARD_DEPTH[0] > 0
