"""Shapes of the bench suites (SPEC §4): one dataclass per suite and one table of shapes per
(suite, profile, device kind), read through :func:`shapes_for`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_MODES = ("fwd", "fwd+bwd")  # attention modes of --quick unless --modes is given
PROFILES = ("full", "quick", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class AttnShape:
    """One attention problem: ``[B, H_q, N, D]`` queries over a packed ``R | S | W`` segment.

    ``series`` groups shapes that differ only in S (one line per provider and series in the plot).
    """

    name: str
    series: str
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    segment_len: int
    num_read: int
    num_write: int
    masks: Tuple[str, ...] = ("causal", "memory_bidirectional", "full")

    @property
    def seq_len(self) -> int:
        return self.num_read + self.segment_len + self.num_write

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
            "head_dim": self.head_dim, "segment_len": self.segment_len, "num_read": self.num_read,
            "num_write": self.num_write, "seq_len": self.seq_len,
        }


@dataclass(frozen=True)
class HandoffShape:
    """Packing ``[memory (M) | segment embeddings (S) | memory (M)]`` of width ``dim`` for B rows."""

    name: str
    batch: int
    segment_len: int
    num_mem: int
    dim: int

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "segment_len": self.segment_len, "num_read": self.num_mem,
            "num_write": self.num_mem, "seq_len": self.segment_len + 2 * self.num_mem, "dim": self.dim,
        }


@dataclass(frozen=True)
class StepShape:
    """A backbone (random weights) and an RMT step over ``segments`` segments of ``segment_len``."""

    name: str
    family: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    segment_len: int
    num_mem: int
    batch: int
    segments: int

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "heads_q": self.heads, "heads_kv": self.kv_heads,
            "head_dim": self.hidden // self.heads, "segment_len": self.segment_len,
            "num_read": self.num_mem, "num_write": self.num_mem,
            "seq_len": self.segment_len + 2 * self.num_mem, "dim": self.hidden, "layers": self.layers,
            "vocab": self.vocab, "segments": self.segments,
        }


@dataclass(frozen=True)
class ArmtShape(StepShape):
    """An ARMT point: the associative block (one layer's read over ``segment_len + num_mem`` rows and
    write of the ``num_mem`` memory rows, width ``hidden``, memory width ``d_mem``, ``mem_heads``
    heads) and, when ``layers`` > 0, a whole training step of a random ``family`` backbone of those
    sizes over ``segments`` segments. The backbone fields are the step suite's; the packed segment
    is ``[X | W]`` (no read block)."""

    d_mem: int = 64
    mem_heads: int = 1
    block: bool = True  # also time the associative block alone at these sizes

    def sizes(self) -> dict:
        return dict(super().sizes(), num_read=0, seq_len=self.segment_len + self.num_mem)


@dataclass(frozen=True)
class OverheadShape:
    """One size of the overhead suite: attention ``[B, H, N, D]`` (``H_q = H_kv``) over a packed
    ``R | S | W`` segment with ``R = W = num_mem``, under each mask family of ``attention_masks``, and the
    pack of a ``[B, S, dim]`` segment between one ``[num_mem, dim]`` memory fed as both R and W."""

    name: str
    batch: int
    heads: int
    head_dim: int
    segment_len: int
    num_mem: int
    dim: int
    attention_masks: Tuple[str, ...] = ("causal", "memory_bidirectional")

    @property
    def seq_len(self) -> int:
        return self.segment_len + 2 * self.num_mem

    def sizes(self, op: str) -> dict:
        """The row fields of ``op`` (``"segment_attention"`` or ``"pack_segment"``) at this size."""
        common = {"batch": self.batch, "segment_len": self.segment_len, "num_read": self.num_mem,
                  "num_write": self.num_mem, "seq_len": self.seq_len}
        if op == "pack_segment":
            return {**common, "dim": self.dim}
        return {**common, "heads_q": self.heads, "heads_kv": self.heads, "head_dim": self.head_dim}


# The goal point of the CPU quick run: the torch backend vs dense-mask SDPA, fwd+bwd.
GOAL_SHAPE = AttnShape("goal-S1024-M64", "goal", 2, 8, 8, 64, 1024, 64, 64, ("memory_bidirectional",))

# SPEC §4 at full size (GPU). bert-rmt: an encoder shares one block, so R = W = 0 and the 10 memory
# tokens, 499 tokens and 3 special tokens form one segment of 512 under mask "full".
_ATTN_FULL = (
    AttnShape("gpt2-rmt", "gpt2-rmt", 8, 12, 12, 64, 512, 16, 16),
    AttnShape("bert-rmt", "bert-rmt", 8, 12, 12, 64, 512, 0, 0, ("full",)),
    AttnShape("llama1b-rmt-M16", "llama1b-rmt", 4, 32, 8, 64, 1024, 16, 16),
    AttnShape("llama1b-rmt-M32", "llama1b-rmt-M32", 4, 32, 8, 64, 1024, 32, 32),
    AttnShape("llama1b-rmt-M128", "llama1b-rmt-M128", 4, 32, 8, 64, 1024, 128, 128),
    AttnShape("llama8b-rmt-S1024", "llama8b-rmt", 1, 32, 8, 128, 1024, 128, 128),
    AttnShape("llama8b-rmt-S2048", "llama8b-rmt", 1, 32, 8, 128, 2048, 128, 128),
    AttnShape("llama8b-rmt-S4096", "llama8b-rmt", 1, 32, 8, 128, 4096, 128, 128),
)

_ATTN_QUICK_CPU = (
    GOAL_SHAPE,
    AttnShape("gpt2-rmt/cpu", "gpt2-rmt", 1, 4, 4, 64, 512, 16, 16),
    AttnShape("llama1b-rmt/cpu", "llama1b-rmt", 1, 8, 2, 64, 1024, 16, 16),
)

_ATTN_QUICK_CUDA = (
    GOAL_SHAPE,
    _ATTN_FULL[0],
    _ATTN_FULL[2],
)

_ATTN_TINY = (AttnShape("tiny", "tiny", 1, 2, 1, 16, 24, 4, 4),)

_HANDOFF_FULL = (
    HandoffShape("gpt2-rmt", 8, 512, 16, 768),
    HandoffShape("llama1b-rmt-M16", 4, 1024, 16, 2048),
    HandoffShape("llama1b-rmt-M128", 4, 1024, 128, 2048),
    HandoffShape("llama8b-rmt-S4096", 1, 4096, 128, 4096),
)

_HANDOFF_QUICK_CPU = (
    HandoffShape("gpt2-rmt/cpu", 2, 512, 16, 768),
    HandoffShape("llama1b-rmt-M16/cpu", 1, 1024, 16, 2048),
    HandoffShape("llama1b-rmt-M128/cpu", 1, 1024, 128, 2048),
)

_HANDOFF_TINY = (HandoffShape("tiny", 2, 24, 4, 32),)

_STEP_FULL = (
    StepShape("gpt2-rmt", "gpt2", 12, 768, 12, 12, 3072, 50257, 512, 16, 8, 4),
    StepShape("llama1b-rmt", "llama", 16, 2048, 32, 8, 8192, 128256, 1024, 16, 1, 4),
)

_STEP_QUICK_CUDA = (
    StepShape("gpt2-rmt", "gpt2", 12, 768, 12, 12, 3072, 50257, 512, 16, 2, 2),
    StepShape("llama1b-rmt/4-layers", "llama", 4, 2048, 32, 8, 8192, 128256, 1024, 16, 1, 2),
)

# CPU: the same families with 2 layers, a width of 256, a small vocabulary and segments of 128; the
# head dim (64) and the grouped-query ratio (4:1) are kept.
_STEP_CPU = (
    StepShape("gpt2-rmt/cpu", "gpt2", 2, 256, 4, 4, 1024, 1024, 128, 16, 1, 2),
    StepShape("llama1b-rmt/cpu", "llama", 2, 256, 4, 1, 512, 1024, 128, 16, 1, 2),
)

_STEP_TINY = (
    StepShape("tiny-gpt2", "gpt2", 1, 32, 2, 2, 64, 97, 16, 4, 1, 2),
    StepShape("tiny-llama", "llama", 1, 32, 2, 1, 64, 97, 16, 4, 1, 2),
)


# ARMT (SPEC §6): the block at GPT-2 (S 512, M 16) and Llama-3.2-1B (S 1024, M 128) sizes with
# d_mem = 64, one memory head; the step at the step suite's reduced CPU backbones over 4 segments,
# and a narrower GPT-2 over 16 and 64 segments, where the memory of training (and checkpointing) shows.
_ARMT_CPU = (
    ArmtShape("gpt2-armt/cpu", "gpt2", 2, 256, 4, 4, 1024, 1024, 128, 16, 1, 4, 32),
    ArmtShape("llama1b-armt/cpu", "llama", 2, 256, 4, 1, 512, 1024, 128, 16, 1, 4, 32),
    ArmtShape("gpt2-armt-K16/cpu", "gpt2", 2, 128, 2, 2, 512, 512, 32, 16, 1, 16, 32, block=False),
    ArmtShape("gpt2-armt-K64/cpu", "gpt2", 2, 128, 2, 2, 512, 512, 32, 16, 1, 64, 32, block=False),
    # the schedules side by side (SPEC §7): a small Llama, 4 layers over 8 segments (11 diagonal steps
    # instead of 32 layer calls), against the backbone alone over all 512 tokens
    ArmtShape("llama-armt-L4/cpu", "llama", 4, 256, 4, 2, 512, 1024, 64, 16, 1, 8, 32, block=False),
    ArmtShape("gpt2-armt-block", "gpt2", 0, 768, 12, 12, 3072, 50257, 512, 16, 1, 1, 64),
    ArmtShape("llama1b-armt-block", "llama", 0, 2048, 32, 8, 8192, 128256, 1024, 128, 1, 1, 64),
)
_ARMT_QUICK_CPU = tuple(s for s in _ARMT_CPU if s.name not in ("llama1b-armt/cpu", "gpt2-armt-K64/cpu"))
_ARMT_CUDA = (
    ArmtShape("gpt2-armt", "gpt2", 12, 768, 12, 12, 3072, 50257, 1024, 16, 2, 4, 64),
    ArmtShape("llama1b-armt/4-layers", "llama", 4, 2048, 32, 8, 8192, 128256, 1024, 128, 1, 4, 64),
    ArmtShape("llama1b-armt-K16/4-layers", "llama", 4, 2048, 32, 8, 8192, 128256, 1024, 128, 1, 16, 64, block=False),
)
_ARMT_TINY = (ArmtShape("tiny-armt", "gpt2", 1, 32, 2, 2, 64, 97, 8, 4, 1, 3, 8, 2),)

# The overhead suite: a tiny shape, where the call and not the math is the cost (the goals of
# report.print_overhead are set there), and one GPT-2 RMT layer (H12, D64, S512, M16: N = 544; d = 768).
_OVERHEAD_TINY = OverheadShape("tiny", 1, 2, 16, 8, 2, 16)
_OVERHEAD_GPT2 = OverheadShape("gpt2-rmt-layer", 1, 12, 64, 512, 16, 768)


def _reduce_for_cpu(shape: AttnShape) -> AttnShape:
    """A full-size attention shape at B=1 and a quarter of the heads (GQA ratio kept)."""
    return AttnShape(
        shape.name + "/cpu", shape.series, 1, max(1, shape.heads_q // 4), max(1, shape.heads_kv // 4),
        shape.head_dim, shape.segment_len, shape.num_read, shape.num_write, shape.masks,
    )


# (suite, profile, "cpu" | "cuda") -> shapes. On CPU, "full" keeps every SPEC §4 attention shape at
# B=1 with a quarter of the heads; the handoff and step suites run their reduced shapes on CPU; the
# overhead suite runs the same two shapes everywhere (tiny alone in the "tiny" profile).
# The dropout suite: the goal point's memory mask on CPU (a tiny one in "tiny"), GPT-2 RMT and the
# goal point on CUDA.
_DROPOUT_TINY = (AttnShape("tiny", "tiny", 1, 2, 1, 16, 24, 4, 4, ("memory_bidirectional",)),)
_DROPOUT_CUDA = (
    AttnShape("gpt2-rmt", "gpt2", 8, 12, 12, 64, 512, 16, 16, ("memory_bidirectional",)),
    GOAL_SHAPE,
)

_TABLE: Dict[Tuple[str, str, str], tuple] = {}
for _device in ("cpu", "cuda"):
    _TABLE["dropout", "tiny", _device] = _DROPOUT_TINY
    _TABLE["attention", "tiny", _device] = _ATTN_TINY
    _TABLE["handoff", "tiny", _device] = _HANDOFF_TINY
    _TABLE["step", "tiny", _device] = _STEP_TINY
    _TABLE["overhead", "tiny", _device] = (_OVERHEAD_TINY,)
    _TABLE["armt", "tiny", _device] = _ARMT_TINY
    _TABLE["overhead", "quick", _device] = (_OVERHEAD_TINY, _OVERHEAD_GPT2)
    _TABLE["overhead", "full", _device] = (_OVERHEAD_TINY, _OVERHEAD_GPT2)
_TABLE.update({
    ("attention", "quick", "cpu"): _ATTN_QUICK_CPU,
    ("attention", "full", "cpu"): (GOAL_SHAPE,) + tuple(_reduce_for_cpu(s) for s in _ATTN_FULL),
    ("attention", "quick", "cuda"): _ATTN_QUICK_CUDA,
    ("attention", "full", "cuda"): _ATTN_FULL,
    ("handoff", "quick", "cpu"): _HANDOFF_QUICK_CPU,
    ("handoff", "full", "cpu"): _HANDOFF_QUICK_CPU,
    ("handoff", "quick", "cuda"): _HANDOFF_FULL[:2],
    ("handoff", "full", "cuda"): _HANDOFF_FULL,
    ("step", "quick", "cpu"): _STEP_CPU,
    ("step", "full", "cpu"): _STEP_CPU,
    ("step", "quick", "cuda"): _STEP_QUICK_CUDA,
    ("step", "full", "cuda"): _STEP_FULL,
    ("armt", "quick", "cpu"): _ARMT_QUICK_CPU,
    ("armt", "full", "cpu"): _ARMT_CPU,
    ("armt", "quick", "cuda"): _ARMT_CUDA,
    ("armt", "full", "cuda"): _ARMT_CUDA,
    ("dropout", "quick", "cpu"): (GOAL_SHAPE,),
    ("dropout", "full", "cpu"): (GOAL_SHAPE,),
    ("dropout", "quick", "cuda"): _DROPOUT_CUDA,
    ("dropout", "full", "cuda"): _DROPOUT_CUDA,
})


def shapes_for(suite: str, device_type: str, profile: str) -> tuple:
    """The shapes a suite runs: ``profile`` is ``"full"`` (SPEC §4), ``"quick"`` or ``"tiny"`` (tests).

    Raises:
        ValueError: an unknown profile or suite.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    key = (suite, profile, "cuda" if device_type == "cuda" else "cpu")
    if key not in _TABLE:
        raise ValueError(f"unknown suite {suite!r}")
    return _TABLE[key]
