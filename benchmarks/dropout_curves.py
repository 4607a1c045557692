"""Training with attention dropout: the kernel's dropout against SDPA's, on a tiny GPT-2 RMT.

    python benchmarks/dropout_curves.py                     # 300 steps x 3 seeds, CPU
    python benchmarks/dropout_curves.py --steps 50 --seeds 2

The same model, data and initialisation train three times per seed under the drop-in
``RecurrentWrapper`` (``attn_pdrop=0.1``): with ``attn_implementation="sdpa"`` (SDPA with a dense mask
and its own dropout), with ``"sdpa"`` again on another random stream (the control: how far two runs
of the same code drift apart when only the dropout draws differ), and with ``"rmt_kernels"``
(dropout inside ``segment_attention``). The random streams differ, so the runs are compared
statistically: per seed, the mean loss over the last half of the steps; the verdict compares the
differences rmt_kernels - sdpa with the control's differences sdpa' - sdpa over the seeds (a Welch
t statistic of the two sets of differences). Exit status 1 when |t| > 3.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch


def _model(seed: int, attn: str):
    import transformers

    from rmt_kernels.integrations import hf
    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper

    hf.register()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  attn_pdrop=0.1, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg)
    lm.set_attn_implementation(attn)
    cell = MemoryCell(lm, 4, attn_implementation=None)
    return RecurrentWrapper(cell, segment_size=16, max_n_segments=4).train()


def _curve(seed: int, attn: str, steps: int, stream: int) -> list:
    model = _model(seed, attn)
    gen = torch.Generator().manual_seed(1000 + seed)
    # A learnable sequence task: each sequence repeats a random 8-token pattern.
    data = torch.randint(0, 64, (256, 8), generator=gen).repeat(1, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(stream)  # the dropout draws
    losses = []
    for step in range(steps):
        batch = data[(step * 8) % 256 : (step * 8) % 256 + 8]
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    diffs, control = [], []
    for seed in range(args.seeds):
        runs = {
            "sdpa": _curve(seed, "sdpa", args.steps, seed),
            "sdpa, other stream": _curve(seed, "sdpa", args.steps, seed + 10**6),
            "rmt_kernels": _curve(seed, "rmt_kernels", args.steps, seed),
        }
        tail = {name: statistics.fmean(v[args.steps // 2 :]) for name, v in runs.items()}
        diffs.append(tail["rmt_kernels"] - tail["sdpa"])
        control.append(tail["sdpa, other stream"] - tail["sdpa"])
        print(f"seed {seed}: mean loss over steps {args.steps // 2}-{args.steps}: "
              + ", ".join(f"{name} {value:.4f}" for name, value in tail.items()))
    se = math.sqrt(statistics.variance(diffs) / len(diffs) + statistics.variance(control) / len(control))
    t = (statistics.fmean(diffs) - statistics.fmean(control)) / se
    print(f"rmt_kernels - sdpa: mean {statistics.fmean(diffs):+.4f} (sd {statistics.stdev(diffs):.4f}); "
          f"control sdpa' - sdpa: mean {statistics.fmean(control):+.4f} (sd {statistics.stdev(control):.4f}); "
          f"t = {t:.2f}")
    ok = abs(t) <= 3
    print("equivalent within noise" if ok else "NOT equivalent", "(|t| <= 3)" if ok else "(|t| > 3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
