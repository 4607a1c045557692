"""ARMT's associative memory (SPEC §6): the per-layer read ``x + phi(q)^T A / phi(q)^T z`` and the
delta-rule write of the memory rows into ``(A, z)``, with the DPFP feature map fused."""
