"""Step suite: one RMT training step (forward and backward over K segments) of a GPT-2 or Llama shaped
backbone with random weights (``transformers`` configs, nothing downloaded).

Providers:

- ``official``: :class:`OfficialRMT`, the official wrapper's semantics (SPEC §3, branch
  ``babilong-release``) written out here: a learned memory ``[M, d]``, inputs
  ``[memory | embeddings | memory]`` through the Hugging Face model (its own attention, ``"sdpa"``)
  with ``output_hidden_states=True``, every segment's outputs kept, next memory = the last hidden
  state's W rows, the ``k2`` detach rule, concatenated logits and the shifted cross-entropy.
- ``rmt_kernels``: the drop-in ``rmt_kernels.integrations.rmt.RecurrentWrapper`` around a copy of the
  same backbone and memory.

Modes: ``fwd+bwd`` (the loss and its backward) and ``train`` (a whole training step: ``zero_grad``,
forward, backward, ``clip_grad_norm_(1.0)`` and one ``AdamW`` step, each provider with its own
optimizer; what a user's loop runs, so gradient layouts or allocations that slow the optimizer
show here and not in ``fwd+bwd``).

Reported: the step's median time and spread, and (``fwd+bwd``) its memory. On CUDA the memory is
``torch.cuda.max_memory_allocated`` during one step above what was allocated before it (weights and
inputs). On CPU no allocator statistic exists, so the memory reported is the bytes of the distinct
tensors saved for backward (parameters excluded), counted with ``saved_tensors_hooks``: the
activations a step keeps alive until its backward. Dropout is 0 so that both losses can be checked
equal before timing.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .progress import Progress
from .records import Skip, classify_exception, fill_ratios, make_row, untimed_row
from .shapes import StepShape
from .timing import Call, TimingConfig, measure_alternating, summarize

PROVIDERS = ("official", "rmt_kernels")
MODES = ("fwd+bwd", "train")
PEERS = ("official",)
LOSS_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


class OfficialRMT(nn.Module):
    """The official ``RecurrentWrapper(MemoryCell(model, M), segment_size, max_n_segments, k2)`` step.

    Args:
        model: a Hugging Face causal LM (``inputs_embeds`` and ``output_hidden_states`` supported).
        num_mem_tokens: M (R = W = M).
        segment_size: S; segments are cut left-aligned (the last one may be shorter).
        max_n_segments: used by the ``k2`` rule only.
        k2: gradient truncation: the memory produced by segment ``i`` is detached iff ``i >= 1`` and
            ``k2 not in (-1, None)`` and ``i + k2 <= max_n_segments``. Default -1 (full BPTT).

    ``forward(input_ids [B, T] int64, labels [B, T] or None)`` returns ``(loss or None, logits [B, T, V])``.
    """

    def __init__(self, model: nn.Module, num_mem_tokens: int, segment_size: int, max_n_segments: int, k2=-1):
        super().__init__()
        self.model = model
        self.num_mem_tokens = num_mem_tokens
        self.segment_size = segment_size
        self.max_n_segments = max_n_segments
        self.k2 = k2
        emb = model.get_input_embeddings()
        w = emb.weight.detach()
        init = torch.randn(num_mem_tokens, emb.embedding_dim, device=w.device, dtype=w.dtype)
        self.memory = nn.Parameter(init * w.float().std().to(w.dtype))

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        m = self.num_mem_tokens
        emb = self.model.get_input_embeddings()
        memory = self.memory[None].expand(input_ids.shape[0], -1, -1)
        cell_outputs, logits = [], []
        for i, seg in enumerate(input_ids.split(self.segment_size, dim=1)):
            x = torch.cat([memory, emb(seg), memory], dim=1)
            out = self.model(inputs_embeds=x, output_hidden_states=True)
            cell_outputs.append(out)  # the official wrapper keeps every segment's outputs
            logits.append(out.logits[:, m:-m])
            memory = out.hidden_states[-1][:, -m:]
            if i >= 1 and self.k2 not in (-1, None) and i + self.k2 <= self.max_n_segments:
                memory = memory.detach()
        full = torch.cat(logits, dim=1)
        loss = None
        if labels is not None:
            shift_logits = full[:, :-1].reshape(-1, full.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1))
        return loss, full


def build_backbone(shape: StepShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` of ``shape``'s sizes, dropout 0,
    attention ``"sdpa"``, in training mode on ``device`` in ``dtype``, seeded with 0. Raises Skip without
    transformers."""
    try:
        from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
    except ImportError as exc:
        raise Skip(f"the step suite needs transformers (pip install transformers): {exc}") from exc
    positions = shape.segment_len + 2 * shape.num_mem
    if shape.family == "gpt2":
        cfg = GPT2Config(
            n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.heads, n_inner=shape.intermediate,
            vocab_size=shape.vocab, n_positions=max(1024, positions),
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=shape.vocab - 1, eos_token_id=shape.vocab - 1,
        )
    elif shape.family == "llama":
        cfg = LlamaConfig(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
            head_dim=shape.hidden // shape.heads, vocab_size=shape.vocab,
            max_position_embeddings=max(2048, positions), tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"unknown backbone family {shape.family!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(dtype).train()


def drop_in(official: OfficialRMT, shape: StepShape) -> nn.Module:
    try:
        from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper
    except ImportError as exc:
        raise Skip(f"rmt_kernels.integrations.rmt is not importable: {exc}") from exc
    cell = MemoryCell(copy.deepcopy(official.model), shape.num_mem)
    if cell.memory.numel() != official.memory.numel():
        raise ValueError(
            f"MemoryCell.memory has shape {tuple(cell.memory.shape)}, expected [{shape.num_mem}, d]"
        )
    with torch.no_grad():
        cell.memory.copy_(official.memory.detach().reshape(cell.memory.shape))
    return RecurrentWrapper(cell, segment_size=shape.segment_len, max_n_segments=shape.segments, k2=-1)


def loss_fn(name: str, module: nn.Module):
    if name == "official":
        return lambda ids: module(ids, labels=ids)[0]
    return lambda ids: module(input_ids=ids, labels=ids).loss


def _memory(step_loss, module: nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    """MB of one step's memory (see the module docstring for what is counted on each device)."""
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_loss(ids).backward()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_loss(ids)
    loss.backward()
    return sum(saved.values()) / 2**20


def _calls(live: Dict[str, nn.Module], ids: torch.Tensor, mode: str) -> Dict[str, Call]:
    """The timed call of each provider in ``mode`` (see the module docstring)."""
    calls: Dict[str, Call] = {}
    for name, module in live.items():
        fn = loss_fn(name, module)
        if mode == "train":
            opt = torch.optim.AdamW(module.parameters(), lr=1e-6)

            def run(_state, f=fn, m=module, o=opt):
                o.zero_grad(set_to_none=True)
                f(ids).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                o.step()

            calls[name] = ((lambda _slot: None), run)
        else:
            calls[name] = ((lambda _slot, m=module: m.zero_grad(set_to_none=True)),
                           (lambda _state, f=fn: f(ids).backward()))
    return calls


def memory_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated during the step, above weights and inputs"
    return "bytes of tensors saved for backward, parameters excluded (CPU has no allocator peak)"


def run_step(
    shapes: Sequence[StepShape],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
) -> List[dict]:
    """Two points per backbone (modes :data:`MODES`), one row per provider."""
    rows: List[dict] = []
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        if progress is not None:
            progress.start(f"step {shape.name}")
        modules: Dict[str, nn.Module] = {}
        notes = {"official": "HF attention sdpa, output_hidden_states=True, all segment outputs kept",
                 "rmt_kernels": "rmt_kernels.integrations.rmt.RecurrentWrapper"}
        outcome: Dict[str, Tuple[str, str]] = {}
        ids = None
        try:
            backbone = build_backbone(shape, device, dtype)
            official = OfficialRMT(backbone, shape.num_mem, shape.segment_len, shape.segments)
            gen = torch.Generator(device="cpu").manual_seed(1)
            size = (shape.batch, shape.segments * shape.segment_len)
            ids = torch.randint(0, shape.vocab, size, generator=gen).to(device)
            modules["official"] = official
        except Exception as exc:  # noqa: BLE001
            for name in providers:
                outcome[name] = classify_exception(exc)
        if "official" in modules and "rmt_kernels" in providers:
            try:
                modules["rmt_kernels"] = drop_in(modules["official"], shape)
            except Exception as exc:  # noqa: BLE001
                outcome["rmt_kernels"] = classify_exception(exc)
        losses = {}
        for name, module in modules.items():
            if name not in providers:
                continue
            try:
                with torch.no_grad():
                    losses[name] = float(loss_fn(name, module)(ids))
            except Exception as exc:  # noqa: BLE001
                outcome[name] = classify_exception(exc)
        if "official" in losses and "rmt_kernels" in losses:
            a, b = losses["official"], losses["rmt_kernels"]
            tol = LOSS_RTOL.get(dtype, 1e-4) * abs(a)
            if not abs(a - b) <= tol:
                outcome["rmt_kernels"] = (
                    "failed", f"loss {b:.6g} differs from the official {a:.6g} (allowed {tol:.3g})"
                )
        live = {n: m for n, m in modules.items() if n in providers and n not in outcome}
        for mode in MODES:
            times = measure_alternating(_calls(live, ids, mode), device, cfg) if live else {}
            point = []
            for name in providers:
                base = dict(
                    suite="step", provider=name, mode=mode, shape=shape.name, mask="causal", dtype=dname,
                    **shape.sizes(), note=notes.get(name),
                )
                row = untimed_row(env, name, outcome, times.get(name), base)
                if row is not None:
                    point.append(row)
                    continue
                extra = {}
                if mode == "fwd+bwd":
                    try:
                        extra = dict(peak_mem_mb=_memory(loss_fn(name, live[name]), live[name], ids, device),
                                     peak_mem_kind=memory_kind(device))
                    except Exception as exc:  # noqa: BLE001
                        status, reason = classify_exception(exc)
                        point.append(make_row(env, status=status, reason="memory measurement: " + reason, **base))
                        continue
                point.append(make_row(env, status="ok", **extra, **summarize(times[name]), **base))
            fill_ratios(point, PEERS, dense=None)
            rows.extend(point)
        del modules, live, ids
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
