#!/usr/bin/env python3
"""Train OSCAR's shipped byte-level model on the King James Bible and export it to llama2.c.

The model is a small LLaMA-style transformer that matches the semantics of llama2.c's run.c
exactly (so OSCAR's C++ engine, or run.c itself, can run the exported file):

* vocabulary: the 256 byte values; the classifier is the token embedding (shared weights);
* RMSNorm with eps 1e-5: ``x * rsqrt(mean(x^2) + eps) * w``;
* RoPE on q and k rotating ADJACENT pairs (2i, 2i+1) of each head by the angle
  ``pos * 10000^(-2i/head_dim)`` (run.c's rotation, not the half-split one of HF);
* causal attention with grouped-query heads (query head h reads kv head h // (n_heads/n_kv_heads)),
  scale 1/sqrt(head_dim);
* SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``; no biases anywhere; a final RMSNorm.

Training: AdamW, linear warm-up then cosine decay, bf16 autocast, batches of random windows of
``seq_len`` bytes. The corpus is small (4 MB) against what an H200 trains in minutes (about an epoch
a second), and a 2M-parameter model memorizes it if trained long: a first run of 987 epochs reached
0.09 nats/byte on train and 5.88 on held-out. So the number of epochs and a dropout rate are chosen
by short selection runs (``--sweep epochs:dropout,...``) fitted on the train split less its last
~100 KB and scored on that slice; the best is then retrained from the same seed on the whole train
split. The held-out split is scored once, at the end: mean cross-entropy over all of it in
non-overlapping windows. Then the export to the legacy llama2.c format, and a check of the exported
file by an independent float64 numpy forward pass against the torch model (max |logit diff| < 1e-3).
Dropout exists only in training (run.c has none); ``--minutes`` is a wall-clock guard that skips
selection runs which would not leave time for the final one.

Usage (see examples/models/README.md for the shipped run):

    python3 examples/train/train_kjv.py --corpus .corpus/kjv.txt --out OUTDIR --minutes 6
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import struct
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HELDOUT_OFFSET = 4_083_220  # first byte of the held-out split (a line start); train is [0, this)
VOCAB = 256
MAX_FILE_BYTES = 8 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq_len, head_dim):
    """cos and sin of pos * 10000^(-2i/head_dim), [seq_len, head_dim/2], computed in float64."""
    i = np.arange(0, head_dim, 2, dtype=np.float64)
    freq = 1.0 / (10000.0 ** (i / head_dim))
    ang = np.outer(np.arange(seq_len, dtype=np.float64), freq)
    return np.cos(ang), np.sin(ang)


def apply_rope(x, cos, sin):
    """x: [B, T, heads, hd]; rotates adjacent pairs (2i, 2i+1) as run.c does."""
    T = x.shape[1]
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[:T].view(1, T, 1, -1)
    s = sin[:T].view(1, T, 1, -1)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.hd = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.hd, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(n_heads * self.hd, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # query head h reads kv head h // rep (run.c's kv_mul)
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if hasattr(F, "scaled_dot_product_attention"):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hd)
        else:  # old torch (local CPU tests)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = att @ v
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Dropout(nn.Module):
    """Dropout whose rate is a tensor buffer, so that one compiled graph serves every rate
    (training only; the exported model has no dropout, as run.c has none). Rate 0 is the identity."""

    def __init__(self):
        super().__init__()
        self.register_buffer("p", torch.zeros(()), persistent=False)

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * keep.to(x.dtype) / (1.0 - self.p).to(x.dtype)


class Block(nn.Module):
    def __init__(self, dim, hidden, n_heads, n_kv_heads, drop):
        super().__init__()
        self.attention_norm = RMSNorm(dim)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.ffn_norm = RMSNorm(dim)
        self.feed_forward = FeedForward(dim, hidden)
        self.drop = drop  # one module shared by the whole model

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attention(self.attention_norm(x), cos, sin))
        return x + self.drop(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, dim, hidden, n_layers, n_heads, n_kv_heads, seq_len):
        super().__init__()
        self.dim, self.hidden, self.n_layers = dim, hidden, n_layers
        self.n_heads, self.n_kv_heads, self.seq_len = n_heads, n_kv_heads, seq_len
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.dropout = Dropout()
        self.layers = nn.ModuleList(Block(dim, hidden, n_heads, n_kv_heads, self.dropout) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        cos, sin = rope_tables(seq_len, dim // n_heads)
        self.register_buffer("rope_cos", torch.tensor(cos, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", torch.tensor(sin, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """llama2.c's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layers); norms 1."""
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=generator) * std)  # CPU draw: same on any device
            else:
                p.fill_(1.0)

    def forward(self, idx):
        h = self.dropout(self.tok_embeddings(idx))
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return F.linear(self.norm(h), self.tok_embeddings.weight)  # classifier shared


def count_params(dim, hidden, n_layers, n_heads, n_kv_heads):
    hd = dim // n_heads
    per_layer = 2 * dim + dim * n_heads * hd * 2 + dim * n_kv_heads * hd * 2 + 3 * dim * hidden
    return VOCAB * dim + n_layers * per_layer + dim


def export_file_bytes(dim, hidden, n_layers, n_heads, n_kv_heads, seq_len):
    hd = dim // n_heads
    floats = count_params(dim, hidden, n_layers, n_heads, n_kv_heads) + 2 * seq_len * hd // 2
    return 7 * 4 + 4 * floats


# ------------------------------------------------------------------------------------------------
# Export (llama2.c legacy format, version 0) and an independent numpy reader/forward


def export_llama2c(model, path):
    m = model
    hd = m.dim // m.n_heads

    def w(f, t):
        a = t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) else t
        f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())

    with open(path, "wb") as f:
        f.write(struct.pack("<7i", m.dim, m.hidden, m.n_layers, m.n_heads, m.n_kv_heads, VOCAB,
                            m.seq_len))  # vocab > 0: classifier shared with the embedding
        w(f, m.tok_embeddings.weight)
        for L in m.layers: w(f, L.attention_norm.weight)
        for L in m.layers: w(f, L.attention.wq.weight)  # nn.Linear weights are [out, in]
        for L in m.layers: w(f, L.attention.wk.weight)
        for L in m.layers: w(f, L.attention.wv.weight)
        for L in m.layers: w(f, L.attention.wo.weight)
        for L in m.layers: w(f, L.ffn_norm.weight)
        for L in m.layers: w(f, L.feed_forward.w1.weight)
        for L in m.layers: w(f, L.feed_forward.w2.weight)
        for L in m.layers: w(f, L.feed_forward.w3.weight)
        w(f, m.norm.weight)
        cos, sin = rope_tables(m.seq_len, hd)
        w(f, cos)  # freq_cis_real [seq_len, hd/2]
        w(f, sin)  # freq_cis_imag [seq_len, hd/2]
    return os.path.getsize(path)


def numpy_forward(path, tokens):
    """float64 forward pass read straight from the .bin, written from the format (run.c's loop)."""
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv_heads * hd
    kv_mul = n_heads // n_kv_heads
    arr = np.frombuffer(raw, dtype="<f4", offset=28).astype(np.float64)
    pos_ = [0]

    def take(*shape):
        n = int(np.prod(shape))
        a = arr[pos_[0]:pos_[0] + n].reshape(shape)
        pos_[0] += n
        return a

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, n_heads * hd, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, n_heads * hd)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    fcr = take(seq_len, hd // 2)
    fci = take(seq_len, hd // 2)
    wcls = emb if shared else take(vocab, dim)
    assert pos_[0] == arr.size, (pos_[0], arr.size)

    def rmsnorm(x, w):
        return w * (x / np.sqrt(np.mean(x * x) + 1e-5))

    T = len(tokens)
    kc = np.zeros((n_layers, T, kv_dim))
    vc = np.zeros((n_layers, T, kv_dim))
    out = np.zeros((T, vocab))
    rope_table_err = 0.0
    for pos, tok in enumerate(tokens):
        x = emb[tok].copy()
        # run.c: for i in 0..dim step 2: head_dim = i % head_size; freq = 10000^-(head_dim/head_size)
        i = np.arange(0, dim, 2)
        ang = pos * (1.0 / 10000.0 ** ((i % hd) / hd))
        fr, fi = np.cos(ang), np.sin(ang)
        rope_table_err = max(rope_table_err, np.abs(fr[: hd // 2] - fcr[pos]).max(),
                             np.abs(fi[: hd // 2] - fci[pos]).max())
        for l in range(n_layers):
            xb = rmsnorm(x, rms_att[l])
            q = wq[l] @ xb
            k = wk[l] @ xb
            v = wv[l] @ xb
            q0, q1 = q[0::2].copy(), q[1::2].copy()
            q[0::2], q[1::2] = q0 * fr - q1 * fi, q0 * fi + q1 * fr
            nk = kv_dim // 2
            k0, k1 = k[0::2].copy(), k[1::2].copy()
            k[0::2], k[1::2] = k0 * fr[:nk] - k1 * fi[:nk], k0 * fi[:nk] + k1 * fr[:nk]
            kc[l, pos], vc[l, pos] = k, v
            att_out = np.zeros(n_heads * hd)
            for h in range(n_heads):
                g = h // kv_mul
                qh = q[h * hd:(h + 1) * hd]
                kh = kc[l, :pos + 1, g * hd:(g + 1) * hd]
                vh = vc[l, :pos + 1, g * hd:(g + 1) * hd]
                s = kh @ qh / math.sqrt(hd)
                s = np.exp(s - s.max())
                s /= s.sum()
                att_out[h * hd:(h + 1) * hd] = s @ vh
            x = x + wo[l] @ att_out
            xb = rmsnorm(x, rms_ffn[l])
            a = w1[l] @ xb
            b = w3[l] @ xb
            x = x + w2[l] @ (a / (1.0 + np.exp(-a)) * b)
        out[pos] = wcls @ rmsnorm(x, rms_final)
    return out, rope_table_err


# ------------------------------------------------------------------------------------------------
# Training



def parse_sweep(text):
    """'4:0,10:0.15' -> [(4.0, 0.0), (10.0, 0.15)]: (epochs, dropout) for each selection run."""
    out = []
    for item in text.split(","):
        e, d = item.split(":")
        out.append((float(e), float(d)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=".corpus/kjv.txt")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=6.0,
                    help="wall-clock guard: selection runs that would not leave time for the final run are skipped")
    ap.add_argument("--heldout-offset", type=int, default=HELDOUT_OFFSET)
    ap.add_argument("--val-bytes", type=int, default=100_000,
                    help="selection runs hold out about this many bytes at the end of the train split")
    ap.add_argument("--sweep", default="4:0,10:0,10:0.15,25:0.15,25:0.3",
                    help="selection runs as epochs:dropout; the best by validation loss is retrained on the "
                         "whole train split")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=368)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps (at most a tenth of a run)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--val-points", type=int, default=6, help="validation evaluations per selection run")
    ap.add_argument("--check-bytes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--name", default="kjv-byte")
    args = ap.parse_args()

    t_start = time.time()
    deadline = t_start + args.minutes * 60.0
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, args.name + ".log")
    log_f = open(log_path, "w")

    def log(msg=""):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 evaluation/check stays fp32
    torch.backends.cudnn.allow_tf32 = False

    cfg = dict(dim=args.dim, hidden_dim=args.hidden, n_layers=args.n_layers, n_heads=args.n_heads,
               n_kv_heads=args.n_kv_heads, vocab_size=VOCAB, seq_len=args.seq_len,
               head_dim=args.dim // args.n_heads)
    assert args.dim % args.n_heads == 0 and args.n_heads % args.n_kv_heads == 0
    n_params = count_params(args.dim, args.hidden, args.n_layers, args.n_heads, args.n_kv_heads)
    file_bytes = export_file_bytes(args.dim, args.hidden, args.n_layers, args.n_heads, args.n_kv_heads,
                                   args.seq_len)
    sweep = parse_sweep(args.sweep)

    log("# train_kjv.py: byte-level llama2.c-style model on the King James Bible")
    log("command: python3 " + " ".join(sys.argv))
    log("date (UTC): " + datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
    log(f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"cuda {torch.version.cuda}, device {torch.cuda.get_device_name(dev) if cuda else 'cpu'}")
    log(f"host: {platform.node()} {platform.machine()}")
    log("args: " + json.dumps(vars(args)))
    log("config: " + json.dumps(cfg))
    log(f"parameters: {n_params:,} (classifier shared with the embedding)")
    log(f"export size: {file_bytes:,} bytes (limit {MAX_FILE_BYTES:,})")
    if file_bytes > MAX_FILE_BYTES:
        log("ERROR: the exported file would exceed the size limit")
        sys.exit(2)

    raw = open(args.corpus, "rb").read()
    corpus_sha = hashlib.sha256(raw).hexdigest()
    log(f"corpus: {args.corpus}, {len(raw):,} bytes, sha256 {corpus_sha}")
    H = args.heldout_offset
    assert raw[H - 1:H] == b"\n", "held-out offset must be a line start"
    V = raw.rfind(b"\n", 0, H - args.val_bytes) + 1  # validation slice starts at a line start too
    log(f"split: train bytes [0, {H:,}) = {H:,}; held-out bytes [{H:,}, {len(raw):,}) = {len(raw) - H:,}")
    log(f"selection runs: fit on [0, {V:,}), validate on [{V:,}, {H:,}) ({H - V:,} bytes); the final model is "
        f"retrained on the whole train split [0, {H:,}); the held-out split is evaluated once, at the end")
    to_dev = lambda b: torch.from_numpy(np.frombuffer(b, dtype=np.uint8).copy()).to(dev)
    train_all, fit, val, held = to_dev(raw[:H]), to_dev(raw[:V]), to_dev(raw[V:H]), to_dev(raw[H:])
    held_np = np.frombuffer(raw[H:], dtype=np.uint8)

    model = Transformer(args.dim, args.hidden, args.n_layers, args.n_heads, args.n_kv_heads, args.seq_len).to(dev)
    assert sum(p.numel() for p in model.parameters()) == n_params
    fwd = model
    compiled = False
    if cuda and not args.no_compile and hasattr(torch, "compile"):
        fwd = torch.compile(model)
        compiled = True

    T = args.seq_len
    offs = torch.arange(T + 1, device=dev)
    amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else torch.autocast(
        device_type="cpu", dtype=torch.bfloat16, enabled=False)

    @torch.no_grad()
    def split_loss(data, bf16=False):
        """Mean next-byte cross-entropy (nats) over all of `data` in non-overlapping windows of T inputs."""
        model.eval()
        n_pred = len(data) - 1
        starts = list(range(0, n_pred, T))
        total, count = 0.0, 0
        full = [s for s in starts if s + T <= n_pred]
        rest = [s for s in starts if s + T > n_pred]
        ctx = amp if bf16 else torch.autocast(device_type=dev.type, enabled=False)
        with ctx:
            for i in range(0, len(full), 16):
                ch = data[torch.tensor(full[i:i + 16], device=dev)[:, None] + offs].long()
                logits = model(ch[:, :-1]).float()
                total += F.cross_entropy(logits.view(-1, VOCAB), ch[:, 1:].reshape(-1), reduction="sum").item()
                count += ch[:, 1:].numel()
            for s in rest:  # the last, shorter window
                ch = data[s:n_pred + 1].long()[None]
                logits = model(ch[:, :-1]).float()
                total += F.cross_entropy(logits.view(-1, VOCAB), ch[:, 1:].reshape(-1), reduction="sum").item()
                count += ch[:, 1:].numel()
        model.train()
        return total / count, count, len(starts)

    state = dict(compiled=compiled, fwd=fwd)

    def train_run(tag, data, epochs, dropout, val_data=None):
        """One full training run from a fresh (seeded) init; returns a dict of its results."""
        gcpu = torch.Generator().manual_seed(args.seed)
        model.reset_parameters(gcpu)
        model.dropout.p.fill_(dropout)
        model.train()
        gen = torch.Generator(device=dev)
        gen.manual_seed(args.seed)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        opt_kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        if cuda:
            opt_kw["fused"] = True
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], **opt_kw)
        steps = max(1, math.ceil(epochs * len(data) / (args.batch * T)))
        warmup = max(1, min(args.warmup, steps // 10))

        def lr_at(step):
            if step < warmup:
                return args.lr * (step + 1) / warmup
            r = min(1.0, (step - warmup) / max(1, steps - warmup))
            return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (args.lr - args.min_lr)

        val_every = max(1, steps // args.val_points) if val_data is not None else 0
        log(f"[{tag}] {epochs:g} epochs of {len(data):,} bytes, dropout {dropout:g}: {steps} steps of "
            f"{args.batch} x {T} bytes, warm-up {warmup}")
        t0 = time.time()
        tok, t_log, curve = 0, time.time(), []
        for step in range(steps):
            lr = lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            ix = torch.randint(0, len(data) - T - 1, (args.batch,), device=dev, generator=gen)
            ch = data[ix[:, None] + offs].long()
            x, y = ch[:, :-1], ch[:, 1:]

            def step_fn(f):
                with amp:
                    logits = f(x)
                loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                return loss.detach(), torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)

            if step == 0 and state["compiled"]:
                try:
                    loss, gn = step_fn(state["fwd"])
                except Exception as e:  # depends on the device's toolchain
                    log(f"torch.compile failed ({type(e).__name__}: {e}); falling back to eager")
                    state["fwd"], state["compiled"] = model, False
                    loss, gn = step_fn(model)
            else:
                loss, gn = step_fn(state["fwd"])
            opt.step()
            tok += x.numel()
            n = step + 1
            if n % args.log_every == 0 or n == steps:
                now = time.time()
                log(f"[{tag}] step {n:6d}/{steps} | loss {loss.item():.4f} | lr {lr:.3e} | grad-norm {float(gn):.3f} "
                    f"| {tok / max(1e-9, now - t_log):,.0f} tok/s | {now - t_start:6.1f} s")
                tok, t_log = 0, now
            if val_every and (n % val_every == 0 or n == steps):
                vl = split_loss(val_data, bf16=True)[0]
                curve.append((n, round(vl, 4)))
                log(f"[{tag}] validation at step {n}: {vl:.4f} nats/byte (bf16)")
        if cuda:
            torch.cuda.synchronize()
        secs = time.time() - t0
        res = dict(tag=tag, epochs=epochs, dropout=dropout, steps=steps, seconds=round(secs, 1),
                   tokens=steps * args.batch * T, last_train_loss=loss.item(), val_curve=curve)
        if val_data is not None:
            res["val"] = split_loss(val_data)[0]  # fp32
            log(f"[{tag}] done in {secs:.1f} s; validation {res['val']:.4f} nats/byte (fp32)")
        else:
            log(f"[{tag}] done in {secs:.1f} s")
        return res

    log(f"training: AdamW lr {args.lr} (betas 0.9/0.95, warm-up then cosine to {args.min_lr}), weight decay "
        f"{args.weight_decay}, clip {args.grad_clip}, batch {args.batch} x {T} bytes, bf16 autocast {cuda}, "
        f"torch.compile {compiled}; selection runs (epochs:dropout): {args.sweep}")
    results, per_epoch, measured = [], None, None
    final_reserve = lambda e: (per_epoch or 0.0) * e * H / V + 30.0
    max_epochs = max(e for e, _ in sweep)
    for k, (epochs, dropout) in enumerate(sweep):
        if per_epoch is not None and time.time() + per_epoch * epochs + final_reserve(max_epochs) > deadline:
            log(f"[sel{k}] skipped: not enough time left under --minutes {args.minutes}")
            continue
        r = train_run(f"sel{k}", fit, epochs, dropout, val)
        if k == 0 and state["compiled"]:
            per_epoch = r["seconds"] / epochs  # includes compilation: pessimistic, replaced below
        else:
            per_epoch = r["seconds"] / epochs if measured is None else max(measured, r["seconds"] / epochs)
            measured = per_epoch
        results.append(r)
    best = min(results, key=lambda r: r["val"])
    log("selection: " + "; ".join(f"{r['epochs']:g} ep / dropout {r['dropout']:g} -> {r['val']:.4f}" for r in results))
    log(f"selected: {best['epochs']:g} epochs, dropout {best['dropout']:g} (validation {best['val']:.4f} nats/byte)")

    final = train_run("final", train_all, best["epochs"], best["dropout"])
    model.eval()
    train_seconds = time.time() - t_start

    # ---- held-out evaluation, fp32, whole split, non-overlapping windows ----
    t0 = time.time()
    held_nats, held_n, held_w = split_loss(held)
    log(f"held-out: {held_nats:.4f} nats/byte = {held_nats / math.log(2):.4f} bits/byte "
        f"(fp32, {held_n:,} predictions in {held_w} non-overlapping windows of <= {T}; {time.time() - t0:.1f} s)")
    tail = train_all[-(256 * T + 1):]
    train_nats, train_n, _ = split_loss(tail)
    log(f"train (last {train_n:,} bytes of the train split, same procedure): {train_nats:.4f} nats/byte = "
        f"{train_nats / math.log(2):.4f} bits/byte")

    # ---- export and check ----
    model.eval()
    bin_path = os.path.join(args.out, args.name + ".bin")
    size = export_llama2c(model, bin_path)
    log(f"exported {bin_path}: {size:,} bytes (expected {file_bytes:,}; limit {MAX_FILE_BYTES:,})")
    assert size == file_bytes and size <= MAX_FILE_BYTES

    check = held_np[:args.check_bytes].astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(check)[None].to(dev)).float().cpu().numpy()[0].astype(np.float64)
    t0 = time.time()
    npl, rope_err = numpy_forward(bin_path, check.tolist())
    diff = float(np.abs(npl - ref).max())
    agree = float((npl.argmax(-1) == ref.argmax(-1)).mean())
    log(f"export check: numpy float64 forward of {bin_path} over the first {len(check)} held-out bytes vs the "
        f"torch model in fp32: max |logit diff| = {diff:.3e} (argmax agreement {agree:.3f}; logits span "
        f"{ref.min():.2f}..{ref.max():.2f}; RoPE tables vs run.c angles max diff {rope_err:.1e}; "
        f"{time.time() - t0:.1f} s) -> {'PASS' if diff < 1e-3 else 'FAIL'}")
    lse = npl.max(-1) + np.log(np.exp(npl - npl.max(-1, keepdims=True)).sum(-1))
    np_nats = float(np.mean(lse[:-1] - npl[np.arange(len(check) - 1), check[1:]]))
    log(f"numpy forward loss over those {len(check) - 1} predictions: {np_nats:.4f} nats/byte")

    summary = dict(
        model=os.path.basename(bin_path), config=cfg, parameters=n_params, file_bytes=size,
        corpus=os.path.basename(args.corpus), corpus_bytes=len(raw), corpus_sha256=corpus_sha,
        train_bytes=[0, H], heldout_bytes=[H, len(raw)], selection_fit_bytes=[0, V], selection_val_bytes=[V, H],
        selection_runs=results, selected=dict(epochs=best["epochs"], dropout=best["dropout"]),
        final_steps=final["steps"], final_tokens=final["tokens"], final_epochs=best["epochs"],
        final_train_seconds=final["seconds"], batch=args.batch, total_train_seconds=round(train_seconds, 1),
        heldout_nats_per_byte=held_nats, heldout_bits_per_byte=held_nats / math.log(2),
        heldout_predictions=held_n, train_tail_nats_per_byte=train_nats,
        export_check_max_abs_logit_diff=diff, export_check_pass=diff < 1e-3, export_check_bytes=len(check),
        args=vars(args), command="python3 " + " ".join(sys.argv),
        date_utc=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        torch=torch.__version__, numpy=np.__version__, gpu=torch.cuda.get_device_name(dev) if cuda else "cpu",
        compiled=state["compiled"],
    )
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(f"done in {time.time() - t_start:.1f} s")
    if diff >= 1e-3:
        sys.exit(1)


if __name__ == "__main__":
    main()
