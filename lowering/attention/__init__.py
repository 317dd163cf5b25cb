"""Attention kernels and their launchers, grouped by kernel.

``decode/`` the split-KV decode kernel over full-precision and packed caches, ``scored/`` the fused
scoring pass of budgeted decode steps and the attention over the kept tokens, ``early_exit/`` decode
attention with a proven stopping bound, ``append/`` quantize-on-append, ``device/`` the device functions
they share (reductions, softmax-state merge, fixed point, rotation). In each kernel folder ``kernel.py``
is pure ``@triton.jit`` code and ``launcher.py`` validates, picks tiles and launches.

triton is optional: it is imported by ``lowering.attention.launchers`` alone, when a kernel is first
needed (and under ``TRITON_INTERPRET=1`` that must happen after the variable is set). The modules directly
under this package (``exact``, ``grid``, ``launchers``) import no triton.
"""
