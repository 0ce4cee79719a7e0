// Always-on validation of the CSR offset arrays a kernel dereferences (mvpp class-level guard).
//
// The Python wrappers validate offsets too, but those checks are skipped while torch.compile traces
// and with check_inputs=False; the kernels index member/centroid arrays with these offsets, so every
// CPU kernel validates them here, in O(n_offsets), before touching memory. Host-side only.
#pragma once
#include <ATen/ATen.h>

namespace mvpp {

// off: contiguous int64 CPU tensor. Requires off.numel() == n_groups + 1, off[0] == 0,
// non-decreasing, off[n_groups] == n_items.
inline void check_csr_offsets(const at::Tensor& off, int64_t n_groups, int64_t n_items, const char* op,
                              const char* name) {
  TORCH_CHECK(off.dim() == 1 && off.numel() == n_groups + 1, op, ": ", name, " must have shape (", n_groups + 1,
              ",), got ", off.sizes());
  TORCH_CHECK(off.scalar_type() == at::kLong && off.is_contiguous(), op, ": ", name,
              " must be contiguous int64 (internal)");
  if (!off.device().is_cpu()) return;  // device kernels check on their own side
  const int64_t* p = off.data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0, op, ": ", name, "[0] must be 0, got ", p[0]);
  for (int64_t i = 0; i < n_groups; ++i) {
    TORCH_CHECK(p[i + 1] >= p[i], op, ": ", name, " must be non-decreasing, got ", name, "[", i, "] = ", p[i],
                " > ", name, "[", i + 1, "] = ", p[i + 1]);
  }
  TORCH_CHECK(p[n_groups] == n_items, op, ": ", name, "[-1] must be ", n_items, " (the number of items), got ",
              p[n_groups]);
}

}  // namespace mvpp
