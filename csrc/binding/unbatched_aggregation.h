// fastmtl._C's lean entries for unbatched aggregation calls (see unbatched_aggregation.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace fastmtl::binding {

void bind_unbatched_aggregation(pybind11::module_& m);

}  // namespace fastmtl::binding
