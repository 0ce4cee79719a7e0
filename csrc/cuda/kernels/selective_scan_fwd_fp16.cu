// One explicit instantiation per file so the kernels compile in parallel (see selective_scan.cuh).
#include "mvpp/selective_scan.cuh"

template cudaError_t mvpp::cuda::selective_scan_fwd_launch<__half>(const mvpp::cuda::SelectiveScanParams&, cudaStream_t);
