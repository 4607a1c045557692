"""The memory handoff: pack ``[read memory | segment | write memory]`` (from embeddings or token ids)
and unpack it, with fused Triton kernels and a torch fallback."""
