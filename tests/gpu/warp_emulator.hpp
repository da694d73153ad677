// SPDX-License-Identifier: Apache-2.0
/// \file
/// A host emulation of one 32-lane NVIDIA warp for the warp policy of
/// `oscar/backend/gpu/mma_core.hpp`: 32 host threads run the same lane code in step, meeting
/// at a barrier in every collective operation. `mma` follows the PTX ISA's fragment layouts of
/// `mma.m16n8k16.row.col.f32.f16.f16.f32` and `movmatrix` those of `movmatrix.m8n8.trans.b16`,
/// written from the ISA's tables (independently of the code under test), so the tests check the
/// kernel's data arrangement and arithmetic with no GPU.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#include "oscar/core/numeric.hpp"

namespace emulation {

/// State shared by the 32 lanes of an emulated warp.
struct warp_shared {
  std::barrier<> sync{32};
  float f[32] = {};
  std::uint32_t u[32] = {};
  bool p[32] = {};
  std::uint32_t a[32][4] = {};
  std::uint32_t b[32][2] = {};
  float c[32][4] = {};
};

inline float half_of(std::uint32_t word, int which) {
  return oscar::half_bits_to_float(static_cast<std::uint16_t>(which ? word >> 16 : word & 0xffffu));
}

/// The warp policy: one object per lane.
struct warp {
  warp_shared* sh;
  int lane_id;

  [[nodiscard]] int lane() const { return lane_id; }
  float shfl(float v, int src) {
    sh->f[lane_id] = v;
    sh->sync.arrive_and_wait();
    const float r = sh->f[src];
    sh->sync.arrive_and_wait();
    return r;
  }
  float shfl_xor(float v, int mask) { return shfl(v, lane_id ^ mask); }
  bool any(bool p) {
    sh->p[lane_id] = p;
    sh->sync.arrive_and_wait();
    bool r = false;
    for (bool x : sh->p) r = r || x;
    sh->sync.arrive_and_wait();
    return r;
  }
  /// A warp barrier (orders the lanes' accesses to memory they share).
  void sync() { sh->sync.arrive_and_wait(); }
  /// `*p += v`, atomically among the lanes.
  void atomic_add(std::int32_t* p, std::int32_t v) { std::atomic_ref<std::int32_t>(*p).fetch_add(v); }
  /// Lane (g, t) holds row g, columns 2t, 2t+1 of an 8x8 b16 matrix; returns the same of the
  /// transposed matrix.
  std::uint32_t movmatrix(std::uint32_t a) {
    sh->u[lane_id] = a;
    sh->sync.arrive_and_wait();
    const int g = lane_id >> 2, t = lane_id & 3;
    auto element = [&](int row, int col) -> std::uint32_t {  // of the source matrix
      const std::uint32_t w = sh->u[row * 4 + col / 2];
      return (col & 1) ? w >> 16 : w & 0xffffu;
    };
    const std::uint32_t r = element(2 * t, g) | element(2 * t + 1, g) << 16;
    sh->sync.arrive_and_wait();
    return r;
  }
  /// D = A B + C, A 16x16 (row), B 16x8 (col), fp16 in, fp32 accumulate (in double here).
  void mma(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
    for (int i = 0; i < 4; ++i) {
      sh->a[lane_id][i] = a[i];
      sh->c[lane_id][i] = d[i];
    }
    sh->b[lane_id][0] = b0;
    sh->b[lane_id][1] = b1;
    sh->sync.arrive_and_wait();
    // A[m][k]: lane (m % 8) * 4 + (k % 8) / 2, register (m >= 8) + 2 (k >= 8), half k % 2.
    auto A = [&](int m, int k) {
      return half_of(sh->a[(m % 8) * 4 + (k % 8) / 2][(m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
    };
    // B[k][n]: lane n * 4 + (k % 8) / 2, register (k >= 8), half k % 2.
    auto B = [&](int k, int n) { return half_of(sh->b[n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k & 1); };
    const int g = lane_id >> 2, t = lane_id & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
      const int m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
      double acc = sh->c[lane_id][i];
      for (int k = 0; k < 16; ++k) acc += double(A(m, k)) * double(B(k, n));
      out[i] = static_cast<float>(acc);
    }
    sh->sync.arrive_and_wait();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
  }
};

/// Runs `body(warp&)` on 32 emulated lanes.
inline void run_warp(const std::function<void(warp&)>& body) {
  warp_shared shared;
  std::vector<std::thread> lanes;
  for (int l = 0; l < 32; ++l) {
    lanes.emplace_back([&, l] {
      warp w{&shared, l};
      body(w);
    });
  }
  for (auto& th : lanes) th.join();
}

}  // namespace emulation
