"""Device functions the attention kernels share: reductions and the MMA wrapper, softmax-state merge (and
stage 2 of the split-KV kernels), fixed point, Hadamard rotation."""
