# SPDX-License-Identifier: Apache-2.0
"""PyTorch fp16 decode attention on the shapes of bench/gpu/decode_bench.cu, timed the same way.

torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True) with one query token,
32 query heads, 8 KV heads, head_dim 128, fp16 K/V of (batch, context) tokens. Each timed call
follows a 256 MiB write that evicts L2; the median of --iters calls (CUDA events) is reported,
with the bytes of K and V it must read. Prints `csv,sdpa,batch,context,us,bytes` lines.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--shapes", default="1x32768,1x131072,4x131072,16x32768")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    hq, hkv, d = 32, 8, 128
    for batch, context in shapes:
        gen = torch.Generator(device=dev).manual_seed(batch * 1000003 + context)
        q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.float16, generator=gen)
        k = torch.randn(batch, hkv, context, d, device=dev, dtype=torch.float16, generator=gen)
        v = torch.randn(batch, hkv, context, d, device=dev, dtype=torch.float16, generator=gen)
        for _ in range(5):
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        torch.cuda.synchronize()
        times = []
        for i in range(args.iters):
            flush.fill_(i & 0xFF)
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        us = statistics.median(times)
        nbytes = 2 * k.numel() * k.element_size()
        print(f"sdpa {batch}x{context // 1024}K: {us:.1f} us, {nbytes / us / 1e3:.0f} GB/s of K+V")
        print(f"csv,sdpa,{batch},{context},{us:.3f},{nbytes}")
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
