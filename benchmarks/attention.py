"""Benchmark: tokenmill's attention (pipeline.models.layers.attention) against PyTorch's fused
`F.scaled_dot_product_attention`, forward + backward, on this machine's CPU, in one run.

Each case is a batch of `--tokens` query positions cut into rows of S keys (S = 96 is the demo decoder's
window, ~800 the VALL-E's), `--heads` heads of `--head-size`, with the packed rows' document mask (two
documents a row, causal). Both contenders get the same tensors; each is timed over `--steps` forward +
backward passes after 3 warm-ups, alternating, `--repeat` times, and the median is kept. One thread, as a
1-CPU Ray Train worker has. Prints the time of each and RATIO fused / tokenmill (> 1: tokenmill's is
faster); at S > layers.CPU_EXPLICIT_KEYS the two are the same kernel, so the ratio is ~1 there.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.models.layers import CPU_EXPLICIT_KEYS, attention, document_mask

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _inputs(rows: int, keys: int, heads: int, head_size: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, heads, keys, head_size, generator=generator).to(dtype).requires_grad_()
               for _ in range(3))
    doc_ids = (torch.arange(keys) >= keys // 3).long().expand(rows, keys)   # two documents a row
    return q, k, v, document_mask(doc_ids)


def _seconds(kernel, q, k, v, mask, steps: int) -> float:
    """Mean seconds of one forward + backward of `kernel` over `steps`, after 3 warm-ups."""
    for i in range(3 + steps):
        if i == 3:
            started = time.perf_counter()
        kernel(q, k, v, mask).float().sum().backward()
    return (time.perf_counter() - started) / steps


def fused(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, nargs="+", default=[96, 192, 256, 512, 1024])
    parser.add_argument("--tokens", type=int, default=2048, help="query positions a batch (rows x keys)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=32)
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=list(DTYPES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU, 1 thread; {args.tokens} positions a batch, {args.heads} heads x {args.head_size}; "
          f"explicit matmuls up to {CPU_EXPLICIT_KEYS} keys")
    for name in args.dtype:
        for keys in args.keys:
            inputs = _inputs(max(1, args.tokens // keys), keys, args.heads, args.head_size, DTYPES[name])
            times = {"fused": [], "tokenmill": []}
            for _ in range(args.repeat):
                times["fused"].append(_seconds(fused, *inputs, args.steps))
                times["tokenmill"].append(_seconds(attention, *inputs, args.steps))
            base, ours = (statistics.median(times[c]) * 1000 for c in ("fused", "tokenmill"))
            print(f"{name} S={keys:5d}: fused {base:7.1f} ms, tokenmill {ours:7.1f} ms  "
                  f"RATIO fused/tokenmill {base / ours:.2f}", flush=True)


if __name__ == "__main__":
    main()
