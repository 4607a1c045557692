"""Train the official-wrapper drop-in under DDP: ``torchrun --nproc-per-node 2 benchmarks/ddp_example.py``.

Runs on CPU with the gloo backend (on GPUs with NCCL when every rank has one), on a tiny random GPT-2:
each rank takes its half of a right-padded global batch, ``k2`` truncation and non-reentrant gradient
checkpointing are on, and DDP runs with its defaults (the memory and every parameter receive a
gradient in every step, so ``find_unused_parameters`` is not needed). Rank 0 prints the loss of each
step and checks that the replicas stayed equal.

Options: ``--steps N`` (default 3), ``--fsdp2`` (shard every block and the wrapper with
``torch.distributed.fsdp.fully_shard`` instead of DDP).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import GPT2Config, GPT2LMHeadModel

from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fsdp2", action="store_true")
    args = parser.parse_args()

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cell = MemoryCell(GPT2LMHeadModel(config), num_mem_tokens=4, attn_implementation="rmt_kernels")
    model = RecurrentWrapper(cell, segment_size=16, max_n_segments=4, k2=2).to(device)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    if args.fsdp2:
        for block in cell.model.transformer.h:
            fully_shard(block)
        model = fully_shard(model)
    else:
        model = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2 * world, 60), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, 45:] = 0  # right padding on every rank
    local = slice(2 * rank, 2 * rank + 2)
    ids, mask = ids[local].to(device), mask[local].to(device)
    labels = ids.masked_fill(mask == 0, -100)

    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.4f}")

    memory = model.module.memory_cell.memory if isinstance(model, DDP) else model.memory_cell.memory
    memory = (memory.full_tensor() if hasattr(memory, "full_tensor") else memory.detach()).clone()
    # Free the engine (DDP's reducer holds the process group) before the last collectives, so that the
    # group is torn down by destroy_process_group below and not when this frame is cleared.
    del model, optimizer, cell
    copies = [torch.empty_like(memory) for _ in range(world)]
    dist.all_gather(copies, memory)
    same = all(torch.equal(copies[0], c) for c in copies)
    if rank == 0:
        print(f"{'FSDP2' if args.fsdp2 else 'DDP'} on {world} processes ({dist.get_backend()}): "
              f"replicas {'equal' if same else 'DIFFER'}")
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0 and not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
