// SPDX-License-Identifier: Apache-2.0
/// \file
/// Umbrella header: everything OSCAR offers on the host.
#pragma once

#include "oscar/version.hpp"

#include "oscar/attention/host.hpp"
#include "oscar/attention/types.hpp"

#include "oscar/backend/tags.hpp"

#include "oscar/cache/allocator.hpp"
#include "oscar/cache/block_pool.hpp"
#include "oscar/cache/config.hpp"
#include "oscar/cache/kv_cache.hpp"
#include "oscar/cache/serialize.hpp"

#include "oscar/core/bitpack.hpp"
#include "oscar/core/error.hpp"
#include "oscar/core/hadamard.hpp"
#include "oscar/core/macros.hpp"
#include "oscar/core/numeric.hpp"
#include "oscar/core/view.hpp"
#include "oscar/importance/head.hpp"
#include "oscar/importance/threshold.hpp"
#include "oscar/importance/token.hpp"
#include "oscar/policy/policy.hpp"

#include "oscar/quant/codebook.hpp"
#include "oscar/quant/config.hpp"
#include "oscar/quant/float_formats.hpp"
#include "oscar/quant/format_traits.hpp"
#include "oscar/quant/formats.hpp"
#include "oscar/quant/fpq.hpp"
#include "oscar/quant/llama_formats.hpp"
#include "oscar/quant/scale.hpp"
#include "oscar/quant/tensor.hpp"
