// The index source of a CUDA kernel body (DESIGN §5.6): its block and thread, the sizes of the
// grid and the block, the block barrier and the warp shuffle. Each body in csrc/cuda/<op>.cuh is a
// template over it: csrc/cuda/<op>.cu instantiates it with CudaThread, which is CUDA's built-in
// variables and intrinsics and nothing else (the kernel compiles to what the body written with
// them would), and the host emulator (csrc/emulator/host_grid.h) with a thread it runs as a fiber,
// so that the very source the GPU compiles is run and checked on a CPU.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define DDPM_FAST_DEVICE __device__ __forceinline__
#else
#define DDPM_FAST_DEVICE inline
#endif

namespace ddpm_fast {

#if defined(__CUDACC__)
struct CudaThread {
  __device__ __forceinline__ unsigned int block() const { return blockIdx.x; }
  __device__ __forceinline__ unsigned int thread() const { return threadIdx.x; }
  __device__ __forceinline__ unsigned int blocks() const { return gridDim.x; }
  __device__ __forceinline__ unsigned int threads() const { return blockDim.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // lane l receives lane l + offset's v (its own v where l + offset ≥ 32); the whole warp takes part
  template <typename T>
  __device__ __forceinline__ T shfl_down(T v, int offset) const {
    return __shfl_down_sync(0xffffffffu, v, offset);
  }
};
#endif

// Blocks of a grid-stride launch over `work` items, `threads` a block: enough for one item a thread,
// at least one, at most 65535·32 (the loop covers the rest).
inline unsigned int grid_stride_blocks(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 32));
}

}  // namespace ddpm_fast
