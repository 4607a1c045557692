"""rmt_kernels: fused attention, memory handoff and associative memory kernels for Recurrent Memory
Transformers (RMT, ARMT).

Public API only. Importing the package never imports triton or the compiled extension, and never
queries a GPU.
"""

__version__ = "0.1.0"

from .errors import BackendUnavailableError
from .layout import MemoryLayout, attention_flops
from .ops.assoc_memory.interface import assoc_read, assoc_write
from .ops.pack_segment.interface import pack_segment, pack_segment_from_ids, unpack_segment
from .ops.segment_attention.interface import segment_attention
from .recurrent import SegmentDriver, SegmentInfo, StepOutput, RecurrentOutput
from .reference import segment_attention_ref

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "MemoryLayout",
    "attention_flops",
    "assoc_read",
    "assoc_write",
    "pack_segment",
    "pack_segment_from_ids",
    "unpack_segment",
    "SegmentDriver",
    "SegmentInfo",
    "StepOutput",
    "RecurrentOutput",
    "segment_attention",
    "segment_attention_ref",
]
