// SPDX-License-Identifier: Apache-2.0
/// \file
/// Cache policies: the concept, the driver, and the built-in policies.
#pragma once

#include "oscar/policy/attention_aware.hpp"
#include "oscar/policy/concept.hpp"
#include "oscar/policy/driver.hpp"
#include "oscar/policy/h2o.hpp"
#include "oscar/policy/snapkv.hpp"
#include "oscar/policy/streaming.hpp"
#include "oscar/policy/uniform.hpp"
