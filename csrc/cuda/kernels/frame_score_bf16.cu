// bf16 instantiation of the frame_score launchers (csrc/include/mvpp/frame_score.cuh).
#include "mvpp/frame_score.cuh"

namespace mvpp {
namespace frame_score {
MVPP_FRAME_SCORE_LAUNCHERS(, __nv_bfloat16)
}  // namespace frame_score
}  // namespace mvpp
