"""One rank of the data-parallel checks of tests/test_distributed.py (not collected by pytest).

Run by the test as ``WORLD_SIZE`` processes with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``): ``python tests/_dist_worker.py OUT.json [CASE ...]``. Each case
builds the same tiny model on every rank, runs two training steps on this rank's half of one global
batch under DDP or FSDP2 (the second step catches what DDP only notices at the next forward), and
compares the gradients with a single-process run on the whole batch whose loss is the mean of the
per-rank losses (what DDP's averaging computes). Rank 0 writes ``{case: max relative gradient
difference, or the error}`` to ``OUT.json``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from rmt_kernels import MemoryLayout, SegmentDriver, StepOutput, segment_attention
from rmt_kernels.streamed import fsdp2_unsharded

warnings.simplefilter("ignore")
B_LOCAL, T, SEG, MEM, VOCAB = 2, 22, 6, 2, 64  # 4 segments, the last one short


def _device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _batch(world: int, device):
    """The global batch (same on every rank): ids, right-padded attention mask, labels (-100 at pads)."""
    g = torch.Generator().manual_seed(1)
    b = B_LOCAL * world
    ids = torch.randint(0, VOCAB, (b, T), generator=g)
    mask = torch.ones(b, T, dtype=torch.long)
    mask[1, T - 7:] = 0  # a padded row on every rank's half (rows 1 and 3)
    mask[b - 1, T - 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _rows(t, rank):
    return t[rank * B_LOCAL : (rank + 1) * B_LOCAL]


def _full_grads(model) -> dict:
    """Parameter gradients as full tensors (FSDP2 shards are gathered)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        name = name.replace("module.", "").replace("_checkpoint_wrapped_module.", "")
        out[name] = None if g is None else g.detach().cpu()
    return out


def _compare(ref: dict, got: dict) -> float:
    """max |g - g_ref| / max |g_ref| over every parameter; every parameter must have a gradient."""
    missing = sorted(k for k in ref if ref[k] is not None and got.get(k) is None)
    if missing:
        raise AssertionError(f"no gradient on {missing[:4]}")
    worst = 0.0
    for k, r in ref.items():
        if r is None:
            continue
        scale = r.abs().max().item() or 1.0
        worst = max(worst, (got[k] - r).abs().max().item() / scale)
    return worst


def _train(model, loss_of, steps: int = 2):
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        loss_of(model).backward()


# --------------------------------------------------------------------------- the official-wrapper drop-in


def _rmt(seed=0, k2=1, checkpointing=None):
    from transformers import GPT2Config, GPT2LMHeadModel
    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = RecurrentWrapper(MemoryCell(GPT2LMHeadModel(cfg), MEM, attn_implementation="rmt_kernels"),
                             segment_size=SEG, max_n_segments=4, k2=k2)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    return model.train()


def _rmt_loss(ids, mask, labels):
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


def case_rmt(engine: str, checkpointing=None, k2=1, **ddp_kwargs):
    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ids, mask, labels = _batch(world, device)
    ref = _rmt(k2=k2, checkpointing=checkpointing).to(device)
    loss = sum(_rmt_loss(_rows(ids, r), _rows(mask, r), _rows(labels, r))(ref) for r in range(world)) / world
    loss.backward()
    model = _rmt(k2=k2, checkpointing=checkpointing).to(device)
    if engine == "ddp":
        model = DDP(model, **ddp_kwargs)
    else:
        for block in model.memory_cell.model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    _train(model, _rmt_loss(_rows(ids, rank), _rows(mask, rank), _rows(labels, rank)))
    return _compare(_full_grads(ref), _full_grads(model))


def case_rmt_trainer():
    """The Hugging Face ``Trainer`` wraps the drop-in in DDP with ``find_unused_parameters=True`` (it is
    not a ``PreTrainedModel``), which rebuilds the output through pytree. Two steps; the replicas must
    stay equal (returned: the largest difference of a parameter between the ranks)."""
    import tempfile
    from transformers import Trainer, TrainingArguments

    world, device = dist.get_world_size(), _device()
    ids, mask, labels = _batch(world, torch.device("cpu"))
    data = [{"input_ids": i, "attention_mask": m, "labels": l} for i, m, l in zip(ids, mask, labels)] * 2
    model = _rmt()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=2, per_device_train_batch_size=B_LOCAL, report_to=[],
                                 save_strategy="no", use_cpu=device.type == "cpu", disable_tqdm=True,
                                 ddp_backend=dist.get_backend())
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    assert isinstance(trainer.model_wrapped, DDP) and trainer.model_wrapped.find_unused_parameters
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(device)
    low, high = flat.clone(), flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return (high - low).abs().max().item()


# --------------------------------------------------------------------------- the Hugging Face integration


def _hf(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    from rmt_kernels.integrations import hf

    hf.register()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation("rmt_kernels")
    hf.set_memory_layout(model, MemoryLayout(MEM, MEM, mask="memory_bidirectional"))
    return model.train()


def _hf_loss(ids, mask, labels):
    # [R | S | W] rows of one packed segment: the R and W tokens are always valid, S right-padded.
    return lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss


def _hf_batch(world, device):
    ids, mask, labels = _batch(world, device)
    mask = mask.clone()
    mask[:, :MEM] = 1
    mask[:, -MEM:] = 1
    mask[1, MEM + 5 : T - MEM] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def case_hf(engine: str, checkpointing=None):
    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ids, mask, labels = _hf_batch(world, device)
    ref = _hf().to(device)
    if checkpointing:
        ref.gradient_checkpointing_enable({"use_reentrant": False})
    loss = sum(_hf_loss(_rows(ids, r), _rows(mask, r), _rows(labels, r))(ref) for r in range(world)) / world
    loss.backward()
    model = _hf().to(device)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    if engine == "ddp":
        model = DDP(model)
    else:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    _train(model, _hf_loss(_rows(ids, rank), _rows(mask, rank), _rows(labels, rank)))
    return _compare(_full_grads(ref), _full_grads(model))


# --------------------------------------------------------------------------- lucidrains' model, patched


def _lucid(seed=0):
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper
    from rmt_kernels.integrations.lucidrains import apply_rmt_kernels

    torch.manual_seed(seed)
    random.seed(seed)  # its hyper-connections draw their initial residual index from Python's random
    model = RecurrentMemoryTransformer(32, num_tokens=VOCAB, depth=2, heads=2, dim_head=16, num_memory_tokens=MEM,
                                       seq_len=SEG)
    for module in model.modules():  # fully_shard refuses 0-d parameters (hyper-connections' scales)
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dim() == 0:
                setattr(module, name, nn.Parameter(param.detach().reshape(1)))
    return apply_rmt_kernels(RecurrentMemoryTransformerWrapper(model)).train()


def _lucid_loss(ids, mask, **kwargs):
    # The wrapper shifts the ids into labels itself, so its mask covers the first T - 1 tokens.
    return lambda m: m(ids, mask=mask[:, :-1].bool(), return_loss=True, **kwargs)[0]


def case_lucidrains(engine: str, **kwargs):
    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ids, mask, _ = _batch(world, device)
    ref = _lucid().to(device)
    loss = sum(_lucid_loss(_rows(ids, r), _rows(mask, r), **kwargs)(ref) for r in range(world)) / world
    loss.backward()
    model = _lucid().to(device)
    if engine == "ddp":
        model = DDP(model)
    else:
        for pair in model.transformer.layers:  # (attention, feed-forward) blocks
            for block in pair:
                fully_shard(block)
        fully_shard(model)
    _train(model, _lucid_loss(_rows(ids, rank), _rows(mask, rank), **kwargs))
    return _compare(_full_grads(ref), _full_grads(model))


# --------------------------------------------------------------------------- the driver's streamed BPTT


class Backbone(nn.Module):
    """A two-layer backbone whose forward is a driver step; it owns the memory and the embedding."""

    def __init__(self, d=32, heads=4, checkpointing=False):
        super().__init__()
        self.checkpointing = checkpointing
        self.emb = nn.Embedding(VOCAB, d)
        self.memory = nn.Parameter(torch.randn(MEM, d) * 0.5)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)
        self.heads = heads

    def forward(self, packed, info):
        b, n, d = packed.shape
        x = packed
        for qkv in self.qkv:
            if self.checkpointing:
                x = checkpoint(self._layer, qkv, x, info, use_reentrant=False)
            else:
                x = self._layer(qkv, x, info)
        hidden = self.norm(x)
        return StepOutput(hidden, logits=self.head(hidden))

    def _layer(self, qkv, x, info):
        b, n, d = x.shape
        q, k, v = qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        o = segment_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), info.layout,
                              segment_lengths=info.segment_lengths)
        return x + o.transpose(1, 2).reshape(b, n, d)


def _streamed(step, module, ids, mask, labels, count, no_sync=None):
    driver = SegmentDriver(MemoryLayout(MEM, MEM, mask="causal"), segment_size=4, k2=1, max_n_segments=6)

    def loss_fn(logits, info):
        return F.cross_entropy(logits.flatten(0, 1), labels[:, info.start:info.end].flatten(),
                               ignore_index=-100, reduction="sum") / count

    return driver.run(step, module.memory, input_ids=ids, embedding_weight=module.emb.weight,
                      attention_mask=mask, loss_fn=loss_fn, no_sync=no_sync)


def case_driver(engine: str, checkpointing=False, explicit=True, **ddp_kwargs):
    """Streamed truncated BPTT (k2=1, 6 segments: 5 backward calls per step). DDP: also counts the
    bucket all-reduces of a step (one bucket here: 1 means one synchronisation per step)."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ids, mask, labels = _batch(world, device)
    torch.manual_seed(0)
    ref = Backbone(checkpointing=checkpointing).to(device)
    for r in range(world):  # each rank's loss is a mean over its valid tokens; DDP averages the ranks
        rows = _rows(labels, r)
        _streamed(ref, ref, _rows(ids, r), _rows(mask, r), rows, (rows != -100).sum() * world)
    torch.manual_seed(0)
    module = Backbone(checkpointing=checkpointing).to(device)
    rows = _rows(labels, rank)
    args = (_rows(ids, rank), _rows(mask, rank), rows, (rows != -100).sum())
    extra = {}
    if engine == "ddp":
        model = DDP(module, **ddp_kwargs)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            return default_hooks.allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_allreduce)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            calls.clear()
            _streamed(model, module, *args, no_sync=model if explicit else None)
        extra["allreduce_calls_per_step"] = len(calls)
        # one bucket here; without no_sync (find_unused_parameters) DDP syncs each of the 5 graphs
        extra["expected_allreduce_calls"] = 5 if ddp_kwargs.get("find_unused_parameters") else 1
    else:
        for layer in module.qkv:
            fully_shard(layer)
        model = fully_shard(module)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with fsdp2_unsharded(model):  # the driver reads the memory and the embedding outside forward
                _streamed(model, module, *args, no_sync=model if explicit else None)
    return _compare(_full_grads(ref), _full_grads(model)), extra


def case_driver_refusals():
    """DDP options a streamed run cannot honour, given explicitly, raise a ValueError before any segment
    runs."""
    torch.manual_seed(0)
    module = Backbone().to(_device())
    ids, mask, labels = _batch(dist.get_world_size(), _device())
    driver = SegmentDriver(MemoryLayout(MEM, MEM, mask="causal"), segment_size=4, k2=1, max_n_segments=6,
                           checkpoint=True)
    loss_fn = lambda logits, info: logits.sum()  # noqa: E731
    for model, expected in ((DDP(module, find_unused_parameters=True), "find_unused_parameters=False"),
                            (DDP(module), "checkpoint=True")):
        try:
            driver.run(model, module.memory, input_ids=ids, embedding_weight=module.emb.weight, loss_fn=loss_fn,
                       no_sync=model)
        except ValueError as exc:
            assert expected in str(exc), exc
        else:
            raise AssertionError(f"no ValueError for {expected}")
    return 0.0


CASES = {
    "rmt/ddp": lambda: case_rmt("ddp"),
    "rmt/ddp k2=-1": lambda: case_rmt("ddp", k2=-1),
    "rmt/ddp checkpointing": lambda: case_rmt("ddp", "non_reentrant"),
    "rmt/ddp find_unused_parameters": lambda: case_rmt("ddp", find_unused_parameters=True),
    "rmt/ddp static_graph": lambda: case_rmt("ddp", static_graph=True),
    "rmt/ddp reentrant checkpointing, static_graph": lambda: case_rmt("ddp", "reentrant", static_graph=True),
    "rmt/fsdp2": lambda: case_rmt("fsdp2"),
    "rmt/hf Trainer (DDP, find_unused_parameters)": case_rmt_trainer,
    "rmt/fsdp2 checkpointing": lambda: case_rmt("fsdp2", "non_reentrant"),
    "hf/ddp": lambda: case_hf("ddp"),
    "hf/ddp checkpointing": lambda: case_hf("ddp", checkpointing=True),
    "hf/fsdp2": lambda: case_hf("fsdp2"),
    "lucidrains/ddp": lambda: case_lucidrains("ddp"),
    "lucidrains/fsdp2": lambda: case_lucidrains("fsdp2"),
    "lucidrains/ddp truncate_at_step=2": lambda: case_lucidrains("ddp", truncate_at_step=2),
    "driver/ddp streamed": lambda: case_driver("ddp"),
    "driver/ddp streamed, checkpointing, default no_sync": lambda: case_driver("ddp", True, explicit=False),
    "driver/ddp streamed, find_unused_parameters and checkpoint=True refused": case_driver_refusals,
    "driver/ddp streamed, find_unused_parameters (default: no no_sync)":
        lambda: case_driver("ddp", explicit=False, find_unused_parameters=True),
    "driver/fsdp2 streamed": lambda: case_driver("fsdp2"),
    "driver/fsdp2 streamed, checkpointing, default no_sync": lambda: case_driver("fsdp2", True, explicit=False),
}


def main(out_path: str, names) -> None:
    backend = os.environ.get("RMT_DIST_BACKEND", "gloo")
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    results = {}
    try:
        for name in names or CASES:
            try:
                value = CASES[name]()
                diff, extra = value if isinstance(value, tuple) else (value, {})
                results[name] = {"max_rel_diff": diff, **extra}
            except Exception as exc:  # reported per case, so that one failure does not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000],
                                 "trace": traceback.format_exc()[-3000:]}
            dist.barrier()
    finally:
        if dist.get_rank() == 0:
            with open(out_path, "w") as f:
                json.dump(results, f, indent=1)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
