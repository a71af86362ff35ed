// Large CPU output buffers (the fused losses' gradients, the TGT step's samples and labels) from a small cache of huge-page blocks.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace tgtfast {

// An uninitialised contiguous CPU tensor of `sizes` (or shaped like `like`). Buffers of 4 MiB or more come from 2 MiB-aligned
// blocks that ask for transparent huge pages, and a freed block is kept for the next request of the same
// size (see cpu_buffers.cpp); smaller ones come from at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);
inline at::Tensor empty_output_like(const at::Tensor& like) { return empty_output(like.sizes(), like.options()); }

// Frees every cached block; returns the bytes released.
int64_t release_cached_buffers();

// Bytes held by cached (free) blocks.
int64_t cached_buffer_bytes();

}  // namespace tgtfast
