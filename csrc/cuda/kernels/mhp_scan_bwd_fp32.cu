// One explicit instantiation per file so the kernels compile in parallel (see mhp_scan.cuh).
#include "mvpp/mhp_scan.cuh"

template cudaError_t mvpp::cuda::mhp::mhp_scan_bwd_launch<float>(const mvpp::cuda::mhp::MhpScanBwdParams&, cudaStream_t);
