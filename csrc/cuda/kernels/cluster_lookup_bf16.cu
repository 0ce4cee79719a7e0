// One dtype's instantiations of the memory-bank scan kernel (csrc/include/mvpp/cluster_lookup.cuh).
#include "mvpp/cluster_lookup.cuh"

namespace mvpp {
namespace cluster_lookup {
template cudaError_t launch_scan_topk<__nv_bfloat16, 32>(const ScanParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_scan_topk<__nv_bfloat16, 128>(const ScanParams<__nv_bfloat16>&, cudaStream_t);
}  // namespace cluster_lookup
}  // namespace mvpp
