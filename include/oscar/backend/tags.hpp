// SPDX-License-Identifier: Apache-2.0
/// \file
/// Backend tags: which implementation an operation runs on. Operations are overloaded (or
/// specialized) on these empty types; a backend that is not built in fails to compile with a
/// message naming the header to include.
#pragma once

namespace oscar::backend {

struct host {};    ///< scalar reference code with float64 accumulation, what tests compare to
struct onednn {};  ///< the production CPU path (oneDNN primitives and vectorized kernels)
struct cuda {};    ///< NVIDIA GPUs
struct hip {};     ///< AMD GPUs

}  // namespace oscar::backend
