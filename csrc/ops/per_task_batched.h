// The batched rule of the fused backward ops whose kernel the tasks cannot share (see
// ops/per_task_batched.cpp), also the below-8-tasks branch of the FusedMLP's own rule.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace fastmtl::ops {

// A boxed kernel at the Batched key: ``op``'s first argument (its cotangent) is a legacy BatchedTensor
// of T tasks' cotangents, the others plain; runs the op's kernel on each task's cotangent and pushes
// every output stacked over the tasks and batched at the same level ([0]-sized "absent" outputs stay
// one unbatched [0] tensor). Refuses other batched arguments and an empty batch, naming the op.
void kernel_per_task(const c10::OperatorHandle& op, torch::jit::Stack* stack);

}  // namespace fastmtl::ops
