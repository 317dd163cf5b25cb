"""The bottom layer of ``lowering``: what storage schemes and attention kernels both use.

Packed buffers and slots (``packed``), the typed operands a scheme hands a kernel (``operands``), the
limits every layer agrees on (``limits``), torch's exact attention (``reference``), the host side of
int8's Hadamard rotation (``rotation``) and the run-time statistics (``stats``). Nothing here imports
triton or any other layer of ``lowering``.
"""
