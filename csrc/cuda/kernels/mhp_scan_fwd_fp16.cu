// One explicit instantiation per file so the kernels compile in parallel (see mhp_scan.cuh).
#include "mvpp/mhp_scan.cuh"

template cudaError_t mvpp::cuda::mhp::mhp_scan_fwd_launch<__half>(const mvpp::cuda::mhp::MhpScanParams&, cudaStream_t);
