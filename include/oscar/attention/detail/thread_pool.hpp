// SPDX-License-Identifier: Apache-2.0
/// \file
/// The worker threads of the CPU attention kernels: a small process-wide pool of
/// `std::thread`s, so OSCAR needs no OpenMP flags from the code that includes it.
///
/// `thread_pool::instance().run(tasks, threads, f)` calls `f(i)` for every `i` in
/// `[0, tasks)`, on the calling thread and up to `threads - 1` workers, handing out tasks one
/// at a time (so uneven tasks balance), and returns when all have run. Workers are started on
/// first use and wait on a futex-backed `std::atomic` between calls, after a short spin so that
/// back-to-back calls (one per layer in a decode step) do not pay a wake-up each.
///
/// A call made while the pool is busy (from another thread, or from inside a task) runs its
/// tasks on the calling thread alone: correct, never a deadlock, just not parallel.
///
/// `parallel_for` is what the kernels call: when the including code is compiled with OpenMP
/// (`_OPENMP`), it runs on OpenMP's threads instead, the ones oneDNN uses on Debian, so the
/// attention kernels and an engine's oneDNN primitives share one team instead of two sets of
/// threads spinning against each other.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "oscar/core/view.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace oscar::attention::detail {

class thread_pool {
 public:
  static thread_pool& instance() {
    static thread_pool pool;
    return pool;
  }

  /// Hardware threads of this machine (at least 1).
  [[nodiscard]] static int hardware_threads() noexcept {
    static const int n = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    return n;
  }

  /// Runs `f(i)` for `i` in `[0, tasks)` on at most `threads` threads. `f` must not throw.
  template <class F>
  void run(index_t tasks, int threads, F&& f) {
    static_assert(std::is_nothrow_invocable_v<F&, index_t>, "tasks must be noexcept");
    threads = static_cast<int>(std::min<index_t>(std::max(threads, 1), tasks));
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (threads <= 1 || !busy.owns_lock()) {
      for (index_t i = 0; i < tasks; ++i) f(i);
      return;
    }
    start_workers(threads - 1);
    using Fn = std::remove_reference_t<F>;
    job_fn_ = [](void* ctx, index_t i) noexcept { (*static_cast<Fn*>(ctx))(i); };
    job_ctx_ = static_cast<void*>(&f);
    job_tasks_ = tasks;
    next_.store(0, std::memory_order_relaxed);
    running_.store(threads - 1, std::memory_order_relaxed);
    // A new generation, with how many workers it wants, in one atomic word: a worker that
    // sees it late still knows whether it was asked (then the call waits for it).
    const std::uint64_t generation = (call_.load(std::memory_order_relaxed) >> 16) + 1;
    call_.store(generation << 16 | static_cast<std::uint64_t>(threads - 1),
                std::memory_order_release);
    call_.notify_all();
    work();
    // Wait for the workers to finish the tasks they took.
    for (int spin = 0; running_.load(std::memory_order_acquire) != 0; ++spin) {
      if (spin < kSpin) continue;
      const int left = running_.load(std::memory_order_acquire);
      if (left != 0) running_.wait(left, std::memory_order_acquire);
    }
  }

  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  ~thread_pool() {
    stop_.store(true, std::memory_order_release);
    call_.fetch_add(1 << 16, std::memory_order_release);
    call_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

 private:
  static constexpr int kSpin = 1 << 14;  ///< polls before blocking (tens of microseconds)
  static constexpr int kMaxWorkers = 255;

  thread_pool() = default;

  void start_workers(int count) {
    count = std::min(count, kMaxWorkers);
    while (static_cast<int>(workers_.size()) < count) {
      const int index = static_cast<int>(workers_.size());
      const std::uint64_t seen = call_.load(std::memory_order_acquire);
      workers_.emplace_back([this, index, seen] { worker(index, seen); });
    }
  }

  /// Takes tasks until none are left.
  void work() noexcept {
    for (index_t i = next_.fetch_add(1, std::memory_order_relaxed); i < job_tasks_;
         i = next_.fetch_add(1, std::memory_order_relaxed)) {
      job_fn_(job_ctx_, i);
    }
  }

  void worker(int index, std::uint64_t seen) noexcept {
    for (;;) {
      std::uint64_t now = call_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < kSpin; ++spin) {
        now = call_.load(std::memory_order_acquire);
      }
      while (now == seen) {
        call_.wait(seen, std::memory_order_acquire);
        now = call_.load(std::memory_order_acquire);
      }
      seen = now;
      if (stop_.load(std::memory_order_acquire)) return;
      if (index >= static_cast<int>(now & 0xffffu)) continue;  // not asked this time
      work();
      if (running_.fetch_sub(1, std::memory_order_acq_rel) == 1) running_.notify_all();
    }
  }

  std::mutex busy_;  ///< held by the thread whose call the workers serve
  std::vector<std::thread> workers_;
  std::atomic<std::uint64_t> call_{0};  ///< generation << 16 | workers wanted; bumped per call
  std::atomic<bool> stop_{false};
  std::atomic<index_t> next_{0};  ///< next task to take
  std::atomic<int> running_{0};   ///< workers of the current call not yet done
  // The current call; written before `call_` is bumped, read by the workers it asked for.
  void (*job_fn_)(void*, index_t) noexcept = nullptr;
  void* job_ctx_ = nullptr;
  index_t job_tasks_ = 0;
};

/// Threads a call uses when `options::threads` is 0: OpenMP's default team size with OpenMP,
/// else one per hardware thread.
inline int default_threads() noexcept {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return thread_pool::hardware_threads();
#endif
}

/// Runs `f(i)` for `i` in `[0, tasks)` on up to `threads` threads (see the file comment).
template <class F>
void parallel_for(index_t tasks, int threads, F&& f) {
#if defined(_OPENMP)
  if (threads > 1 && tasks > 1 && !omp_in_parallel()) {
    static_assert(std::is_nothrow_invocable_v<F&, index_t>, "tasks must be noexcept");
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (index_t i = 0; i < tasks; ++i) f(i);
    return;
  }
#endif
  thread_pool::instance().run(tasks, threads, f);
}

}  // namespace oscar::attention::detail
