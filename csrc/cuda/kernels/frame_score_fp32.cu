// fp32 instantiation of the frame_score launchers (csrc/include/mvpp/frame_score.cuh).
#include "mvpp/frame_score.cuh"

namespace mvpp {
namespace frame_score {
MVPP_FRAME_SCORE_LAUNCHERS(, float)
}  // namespace frame_score
}  // namespace mvpp
