"""Lowerings of kvpass's attention ops, in layers that import one way (``[tool.importlinter]``):

``ops`` (the ``torch.library`` registration Dynamo and Inductor see) -> ``formats`` (what a site's cache
keeps and how one step runs) -> ``storage`` (how keys and values are held) | ``attention`` (Triton kernels
and their launchers; CUDA, and the CPU under ``TRITON_INTERPRET=1`` for tests) -> ``core`` (packed
buffers, operands, limits, reference attention, statistics). Importing this package is cheap: triton is
imported by ``lowering.attention.launchers`` alone, when a kernel is first needed.
"""
