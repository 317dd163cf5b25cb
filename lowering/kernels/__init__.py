"""Pure ``@triton.jit`` kernels, one module per op; launchers live one level up in ``lowering/``.

Nothing is imported here: a kernel is defined when its module is imported, and under
``TRITON_INTERPRET=1`` that must happen after the variable is set.
"""
