"""Lowerings of kvpass's attention ops: reference implementations (any device), Triton kernels
(CUDA, and the CPU under ``TRITON_INTERPRET=1`` for tests), and the ``torch.library`` registration
(``lowering.ops``) that makes them visible to Dynamo and Inductor. Importing this package is cheap:
nothing here imports triton until a kernel is launched."""
