// SPDX-License-Identifier: Apache-2.0
// Programmatic dependent launch (Hopper+): a kernel launched by launchDependent may start while
// the stream's previous kernel is still finishing, so the ~2 us between one grid's end and the
// next one's start (drain, then launch) overlaps the previous grid's tail. Correctness rests on
// waitPriorGrids, the first thing such a kernel does: it returns once the previous grid has
// completed and its writes are visible, and nothing before it may touch global memory. A kernel
// that calls allowDependentLaunch lets the next launchDependent kernel start even earlier, as soon
// as every block of this one has called it (the next one still waits in waitPriorGrids for this
// one's completion): only where that next kernel follows at once within one op (the layout, then
// the HT dispatch), since its blocks hold their SMs while they wait. Without the call the next
// kernel starts as this one's blocks exit. Older GPUs run the same code with the stream's usual
// ordering (the attribute is not set there, and the device calls compile to nothing). Measured on
// 2x H200 (docs/perf-notes.md, session 18): the layout-to-dispatch gap 2.2 -> 0.6 us.
#pragma once

#include <cuda_runtime.h>

namespace epcomm::kernels {

__device__ __forceinline__ void waitPriorGrids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allowDependentLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// <<<blocks, threads, 0, stream>>>(params), with the programmatic-serialization attribute when
// `allowed` (the device has it: BufferCore::dependent_launch, from the compute capability read
// when the buffer was created); the caller checks with EPCOMM_KERNEL_LAUNCH_CHECK as after <<<>>>.
template <typename Params>
void launchDependent(void (*kernel)(Params), dim3 blocks, int threads, cudaStream_t stream,
                     const Params& params, bool allowed) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = blocks;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = allowed ? 1 : 0;
  (void)cudaLaunchKernelEx(&config, kernel, params);  // an error stays as the last error
}

}  // namespace epcomm::kernels
