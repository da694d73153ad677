# SPDX-License-Identifier: Apache-2.0
"""Joins the csv lines of decode_bench and sdpa.py (read from stdin) into one markdown table.

OSCAR rows tagged `oscar` are the default FP2+; rows tagged `oscar-kc` (FP2+ with per-channel
keys, the earlier tensor-core path) add two columns when present."""
import sys

oscar, kc, sdpa = {}, {}, {}
for line in sys.stdin:
    parts = line.strip().split(",")
    if len(parts) < 2 or parts[0] != "csv":
        continue
    if parts[1] in ("oscar", "oscar-kc"):
        b, ctx = int(parts[2]), int(parts[3])
        row = dict(us=float(parts[4]), bytes=float(parts[5]), copy=float(parts[6]),
                   floor=float(parts[7]), append=float(parts[8]))
        (oscar if parts[1] == "oscar" else kc)[(b, ctx)] = row
    elif parts[1] == "sdpa":
        sdpa[(int(parts[2]), int(parts[3]))] = dict(us=float(parts[4]), bytes=float(parts[5]))

copy = next(iter(oscar.values()))["copy"] if oscar else 0.0
print(f"copy bandwidth (1 GiB device-to-device, read + write): {copy / 1e9:.0f} GB/s\n")
extra = " FP2+ kc us | kc speedup |" if kc else ""
print("| batch x context | SDPA fp16 us | SDPA GB/s | OSCAR FP2+ us | OSCAR MB read | OSCAR GB/s "
      "| speedup vs SDPA | floor us | of floor | append GB/s |" + extra)
print("|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if kc else ""))
for key in sorted(oscar, key=lambda k: (k[1], k[0])):
    o = oscar[key]
    s = sdpa.get(key)
    s_us = f"{s['us']:.1f}" if s else "-"
    s_bw = f"{s['bytes'] / s['us'] / 1e3:.0f}" if s else "-"
    ratio = f"**{s['us'] / o['us']:.2f}x**" if s else "-"
    tail = ""
    if kc:
        k = kc.get(key)
        k_us = f"{k['us']:.1f}" if k else "-"
        k_ratio = f"{s['us'] / k['us']:.2f}x" if (k and s) else "-"
        tail = f" {k_us} | {k_ratio} |"
    print(f"| {key[0]} x {key[1] // 1024}K | {s_us} | {s_bw} | {o['us']:.1f} | {o['bytes'] / 1e6:.1f} "
          f"| {o['bytes'] / o['us'] / 1e3:.0f} | {ratio} | {o['floor']:.1f} "
          f"| {100 * o['floor'] / o['us']:.0f}% | {o['append']:.1f} |" + tail)
