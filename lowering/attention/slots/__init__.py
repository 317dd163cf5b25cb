"""Kernels of the budgeted policies' slots on fixed-capacity buffers (``lowering/formats/fixed_budgeted.py``)."""
