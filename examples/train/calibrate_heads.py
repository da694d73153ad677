#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Taylor head importance (Michel et al. 2019) of a llama2.c model, per KV head, for OSCAR policies.

For each KV head h of each layer a mask xi_h (1.0) multiplies the attention output of every query
head that reads h (its GQA group), before wo. On windows x of the training split the score is

    I_h = E_x | dL(x) / d xi_h |,

L(x) the mean next-byte cross-entropy of window x. Since dL/dxi_h = sum over the group's query
heads, tokens and channels of A * dL/dA (A the attention output), this is Michel et al.'s
|sum A_h * dL/dA_h|, with the query heads of a group summed (reduced, never expanded) inside the
absolute value. The scores are then normalized per layer to unit L2 norm (as Michel et al. do
before pruning), and written in OSCAR's head-importance file format (examples/models/README.md,
loaded by oscar::importance::load_head_importance).

As a check that the score means something for OSCAR's "pruned" heads (zeroed query/key weights:
uniform attention, so the head outputs the causal running mean of its values), the script also
measures, on the same windows, the loss increase when one KV head at a time attends uniformly.

The model is read straight from the llama2.c file (examples/engine/llama.hpp documents the layout)
and run in float32 on the CPU; the forward pass is train_kjv.py's (RoPE on adjacent pairs, GQA,
SwiGLU, shared classifier). The corpus split is train_kjv.py's: train = bytes [0, 4,083,220).

Usage (the shipped run, see examples/models/README.md):

    python3 examples/train/calibrate_heads.py --corpus .corpus/kjv.txt \
        --model examples/models/kjv-byte.bin --out examples/models/kjv-byte.heads --windows 256
"""

import argparse
import datetime
import hashlib
import math
import platform
import struct
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HELDOUT_OFFSET = 4_083_220  # train_kjv.py: train is bytes [0, this)


def load_llama2c(path):
    """Weights of a llama2.c legacy checkpoint as float32 tensors (shared classifier only)."""
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    assert vocab > 0, "this script handles the shared-classifier layout of the shipped model"
    hd = dim // n_heads
    a = np.frombuffer(raw, dtype="<f4", offset=28)
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        t = torch.from_numpy(a[at:at + n].copy()).view(*shape)
        at += n
        return t

    w = dict(emb=take(vocab, dim), attn_norm=take(n_layers, dim), wq=take(n_layers, n_heads * hd, dim),
             wk=take(n_layers, n_kv_heads * hd, dim), wv=take(n_layers, n_kv_heads * hd, dim),
             wo=take(n_layers, dim, n_heads * hd), ffn_norm=take(n_layers, dim),
             w1=take(n_layers, hidden, dim), w2=take(n_layers, dim, hidden), w3=take(n_layers, hidden, dim),
             final_norm=take(dim))
    at += 2 * seq_len * hd // 2  # RoPE tables, unused
    assert at == a.size, f"{path}: {a.size - at} unexpected floats at the end"
    cfg = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
               vocab=vocab, seq_len=seq_len, head_dim=hd)
    return cfg, w, hashlib.sha256(raw).hexdigest()


def rmsnorm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def rope(x, cos, sin):
    """x [T, heads, hd]: rotate adjacent pairs (2i, 2i+1) by pos * 10000^(-2i/hd), as run.c."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


def forward(cfg, w, tokens, mask=None, uniform=None):
    """Logits [T, vocab] of one window. mask [layers, kv_heads] multiplies each KV head's group
    output; uniform = (layer, kv_head) makes that head's attention uniform over 0..t (a pruned head)."""
    T = tokens.shape[0]
    hd, H, KV = cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    group = H // KV
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    cos, sin = torch.cos(pos * freq).float(), torch.sin(pos * freq).float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["emb"][tokens]
    for l in range(cfg["n_layers"]):
        h = rmsnorm(x, w["attn_norm"][l])
        q = rope((h @ w["wq"][l].T).view(T, H, hd), cos, sin)
        k = rope((h @ w["wk"][l].T).view(T, KV, hd), cos, sin)
        v = (h @ w["wv"][l].T).view(T, KV, hd)
        k = k.repeat_interleave(group, dim=1)  # query head j reads kv head j // group
        v = v.repeat_interleave(group, dim=1)
        att = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        if uniform is not None and uniform[0] == l:
            u = causal.float() / causal.float().sum(-1, keepdim=True)
            for j in range(uniform[1] * group, (uniform[1] + 1) * group):
                att = torch.cat((att[:j], u[None], att[j + 1:]))
        y = torch.einsum("hts,shd->thd", att, v)  # [T, H, hd]
        if mask is not None:
            y = y * mask[l].repeat_interleave(group)[None, :, None]
        x = x + y.reshape(T, H * hd) @ w["wo"][l].T
        h = rmsnorm(x, w["ffn_norm"][l])
        x = x + (F.silu(h @ w["w1"][l].T) * (h @ w["w3"][l].T)) @ w["w2"][l].T
    return rmsnorm(x, w["final_norm"]) @ w["emb"].T


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".corpus/kjv.txt")
    ap.add_argument("--model", default="examples/models/kjv-byte.bin")
    ap.add_argument("--out", required=True, help="head-importance file to write")
    ap.add_argument("--log", default=None, help="log file (default: OUT with .log appended)")
    ap.add_argument("--windows", type=int, default=256, help="random windows of the train split")
    ap.add_argument("--window-bytes", type=int, default=1024, help="inputs per window (<= seq_len)")
    ap.add_argument("--ablation-windows", type=int, default=64,
                    help="windows (the first of the same draw) for the uniform-attention check; 0 skips it")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    log_f = open(args.log or args.out + ".log", "w")

    def log(msg=""):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    t0 = time.time()
    log("# calibrate_heads.py: Taylor head importance (Michel et al. 2019), per KV head")
    log("command: python3 " + " ".join(sys.argv))
    log("date (UTC): " + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
    log(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"cpu, {torch.get_num_threads()} thread(s)")
    cfg, w, model_sha = load_llama2c(args.model)
    log(f"model: {args.model}, sha256 {model_sha}, config {cfg}")
    raw = open(args.corpus, "rb").read()
    log(f"corpus: {args.corpus}, {len(raw):,} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    train = torch.from_numpy(np.frombuffer(raw[:HELDOUT_OFFSET], dtype=np.uint8).astype(np.int64))
    T = args.window_bytes
    assert 2 <= T <= cfg["seq_len"]
    gen = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, len(train) - T - 1, (args.windows,), generator=gen).tolist()
    log(f"data: {args.windows} windows of {T} input bytes drawn uniformly (seed {args.seed}) from the train "
        f"split [0, {HELDOUT_OFFSET:,}); loss = mean next-byte cross-entropy of a window")

    L, KV, H = cfg["n_layers"], cfg["n_kv_heads"], cfg["n_heads"]
    total = torch.zeros(L, KV, dtype=torch.float64)
    total_sq = torch.zeros(L, KV, dtype=torch.float64)
    loss_sum = 0.0
    for i, s in enumerate(starts):
        chunk = train[s:s + T + 1]
        mask = torch.ones(L, KV, requires_grad=True)
        logits = forward(cfg, w, chunk[:-1], mask=mask)
        loss = F.cross_entropy(logits, chunk[1:])
        loss.backward()
        g = mask.grad.detach().abs().double()
        total += g
        total_sq += g * g
        loss_sum += loss.item()
        if (i + 1) % 32 == 0 or i + 1 == len(starts):
            log(f"window {i + 1:4d}/{len(starts)} | mean loss {loss_sum / (i + 1):.4f} nats/byte | "
                f"{time.time() - t0:6.1f} s")
    n = len(starts)
    mean = total / n
    sem = torch.sqrt(torch.clamp(total_sq / n - mean * mean, min=0.0) / max(1, n - 1))
    norm = mean / mean.norm(dim=1, keepdim=True)
    log("")
    log("raw I_h = E|dL/dxi_h| (nats per unit mask) +- standard error of the mean, and per-layer L2-normalized:")
    for l in range(L):
        for h in range(KV):
            log(f"  layer {l} kv_head {h}: raw {mean[l, h]:.6f} +- {sem[l, h]:.6f}  normalized {norm[l, h]:.6f}")

    if args.ablation_windows > 0:
        m = min(args.ablation_windows, n)
        log("")
        log(f"check: loss increase when one KV head attends uniformly (a pruned head), first {m} windows:")
        with torch.no_grad():
            base = [F.cross_entropy(forward(cfg, w, train[s:s + T]), train[s + 1:s + T + 1]).item()
                    for s in starts[:m]]
            base_mean = sum(base) / m
            log(f"  baseline loss {base_mean:.4f} nats/byte")
            rows = []
            for l in range(L):
                for h in range(KV):
                    d = sum(F.cross_entropy(forward(cfg, w, train[s:s + T], uniform=(l, h)),
                                            train[s + 1:s + T + 1]).item() for s in starts[:m]) / m - base_mean
                    rows.append((l, h, d))
                    log(f"  layer {l} kv_head {h}: +{d:.4f} nats/byte (Taylor normalized {norm[l, h]:.4f})")
        ta = np.array([float(norm[l, h]) for l, h, _ in rows])
        ab = np.array([d for _, _, d in rows])
        rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)
        rho = float(np.corrcoef(rank(ta), rank(ab))[0, 1])
        log(f"  Spearman rank correlation, Taylor score vs uniform-attention loss increase: {rho:.3f}")

    with open(args.out, "w") as f:
        f.write("oscar-head-importance 1\n")
        f.write(f"# Taylor head importance (Michel et al. 2019) of {args.model.split('/')[-1]} "
                f"(sha256 {model_sha})\n")
        f.write(f"# I_h = E|dL/dxi_h| over {n} windows of {T} bytes of the train split, seed {args.seed}; "
                "query heads of a group summed inside |.|\n")
        f.write("# written by examples/train/calibrate_heads.py; format: examples/models/README.md\n")
        f.write(f"layers {L}\nkv_heads {KV}\nscore taylor\nnormalization l2-per-layer\n")
        f.write("# layer kv_head importance\n")
        for l in range(L):
            for h in range(KV):
                f.write(f"{l} {h} {float(norm[l, h]):.6f}\n")
    log("")
    log(f"wrote {args.out}; done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
