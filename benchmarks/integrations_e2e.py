"""End to end through the integrations, on tiny random models (configs built in code, nothing downloaded).

    python benchmarks/integrations_e2e.py              # cuda if present, else cpu
    python benchmarks/integrations_e2e.py --device cpu --steps 3

Three training runs, each a few optimizer steps, as the training scripts drive them:

- ``peft_lora_gpt2``: GPT-2 wrapped by PEFT LoRA (``c_attn``, ``fan_in_fan_out``, the BABILong
  ``--use_lora`` path) inside the drop-in ``MemoryCell`` / ``RecurrentWrapper``, with
  ``max_n_segments=np.ceil(T / S)`` and a bool ``labels_mask``; only the LoRA weights and the memory
  train; then ``generate``;
- ``bf16_autocast_llama``: a grouped-query Llama RMT whose forward runs under
  ``torch.autocast(dtype=torch.bfloat16)`` (what accelerate's bf16 does), backward outside it;
- ``lucidrains``: lucidrains' ``RecurrentMemoryTransformerWrapper`` patched by ``apply_rmt_kernels``,
  its own loss over several segments with XL memories, in float32 and under bf16 autocast.

Each run checks that the losses are finite and that the trained parameters moved, and raises
otherwise; ``tests/test_integration_e2e.py`` runs them in CI. Exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch


def _device(name=None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _train(model, params, loss_fn, steps: int) -> list:
    """``steps`` AdamW steps on ``params``; returns the losses; checks they are finite and that
    ``params`` moved."""
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if not all(math.isfinite(x) for x in losses):
        raise AssertionError(f"non-finite loss: {losses}")
    if not any(not torch.equal(b, p.detach()) for b, p in zip(before, params)):
        raise AssertionError("no trained parameter changed")
    return losses


def peft_lora_gpt2(device: torch.device, steps: int = 2) -> dict:
    import peft
    import transformers

    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper

    vocab, total, segment = 128, 72, 32
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
    ))
    lora = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    backbone = peft.get_peft_model(gpt2, lora)
    model = RecurrentWrapper(
        MemoryCell(backbone, 4, attn_implementation="rmt_kernels"),
        segment_size=segment, max_n_segments=np.ceil(total / segment),
    ).to(device)
    ids = torch.randint(1, vocab, (2, total), device=device)
    labels_mask = torch.zeros_like(ids, dtype=torch.bool)
    labels_mask[:, -16:] = True
    params = [p for p in model.parameters() if p.requires_grad]
    if not any(p is model.memory_cell.memory for p in params) or len(params) == len(list(model.parameters())):
        raise AssertionError("LoRA should leave the base weights frozen and the memory trainable")
    losses = _train(model, params, lambda: model(input_ids=ids, labels=ids, labels_mask=labels_mask).loss, steps)
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
    if tuple(new.shape) != (2, 3):
        raise AssertionError(f"generate returned {tuple(new.shape)}, expected (2, 3)")
    return {"losses": losses}


def bf16_autocast_llama(device: torch.device, steps: int = 2) -> dict:
    import transformers

    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper

    vocab, total = 128, 60
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))
    model = RecurrentWrapper(MemoryCell(llama, 4, attn_implementation="rmt_kernels"), segment_size=16,
                             max_n_segments=4, k2=2).to(device)
    ids = torch.randint(1, vocab, (2, total), device=device)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: the last segment of row 1 runs with segment_lengths

    def loss():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids, attention_mask=mask).loss

    return {"losses": _train(model, list(model.parameters()), loss, steps)}


def lucidrains(device: torch.device, steps: int = 2) -> dict:
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

    from rmt_kernels.integrations.lucidrains import apply_rmt_kernels

    transformer = RecurrentMemoryTransformer(64, num_tokens=128, depth=2, num_memory_tokens=4, seq_len=16,
                                             dim_head=16, heads=4, xl_mem_len=8, rotary_pos_emb=True,
                                             abs_pos_emb=False)
    model = apply_rmt_kernels(RecurrentMemoryTransformerWrapper(transformer)).to(device)
    tokens = torch.randint(0, 128, (2, 49), device=device)
    results = {}
    for name, dtype in (("float32", None), ("bf16_autocast", torch.bfloat16)):
        def loss(dtype=dtype):
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                return model(tokens, return_loss=True)[0]

        results[f"losses_{name}"] = _train(model, list(model.parameters()), loss, steps)
    return results


RUNS = {"peft_lora_gpt2": peft_lora_gpt2, "bf16_autocast_llama": bf16_autocast_llama, "lucidrains": lucidrains}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if present")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    parser.add_argument("--runs", nargs="+", choices=tuple(RUNS), default=tuple(RUNS))
    args = parser.parse_args(argv)
    device = _device(args.device)
    failed = 0
    for name in args.runs:
        start = time.perf_counter()
        try:
            result = RUNS[name](device, args.steps)
        except Exception as exc:  # a failed run is reported and the others still run
            failed += 1
            print(f"{name}: FAILED {type(exc).__name__}: {exc}")
            continue
        print(f"{name}: ok on {device} in {time.perf_counter() - start:.1f}s {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
