// One dtype's instantiations of the memory-bank scan kernel (csrc/include/mvpp/cluster_lookup.cuh).
#include "mvpp/cluster_lookup.cuh"

namespace mvpp {
namespace cluster_lookup {
template cudaError_t launch_scan_topk<float, 32>(const ScanParams<float>&, cudaStream_t);
template cudaError_t launch_scan_topk<float, 128>(const ScanParams<float>&, cudaStream_t);
}  // namespace cluster_lookup
}  // namespace mvpp
