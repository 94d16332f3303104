// 3x3 SAME convolutions (stride 1, NHWC activations, HWIO kernel) for the CPU, as XLA FFI handlers:
//
//   Conv3x3(x, kernel)        y[b, h, w, o] = sum over i, j, c of x[b, h + i - 1, w + j - 1, c] * kernel[i, j, c, o]
//   Conv3x3WeightGrad(x, dy)  dkernel[i, j, c, o] = sum over b, h, w of x[b, h + i - 1, w + j - 1, c] * dy[b, h, w, o]
//
// with x taken as zero outside the image. The input gradient is Conv3x3(dy, the kernel flipped and with
// its channel axes swapped), so two kernels cover all three passes.
//
// XLA's CPU backend computes the weight gradient as an Eigen convolution with an (H, W) "kernel" behind
// two layout transposes, at about a quarter of the matmul peak on 32x32 and 16x16 maps, and its forward
// convolution is slow with few channels. Here both are register-blocked sums of products read straight
// from the NHWC buffers: no transposes, no im2col copy.
//
// A third handler serves BatchNorm and the bias gradients:
//
//   ChannelMoments(a, b, shift)  moments[0, c] = sum over n of a[n, c]
//                                moments[1, c] = sum over n of a[n, c] * (b[n, c] - shift[c])
//
// over every position n of (..., C) arrays, in one parallel pass that reads a and b once. XLA computes
// the same sums as single-threaded products with a vector of ones, after writing the products a * b out.
// Further down: the forward pass and input gradient of small maps (8 pixels wide or less) blocked
// across images, the 2x2 stride-2 transposed convolution's two gradients and per-example channel sums,
// each with the comment that says what it computes.
//
// Built and loaded by ddpm_jax/models/cpu_kernels.py (with -O3 -march=native).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kChannelBlock = 8;  // 8 x 2 accumulators of 16 lanes: 16 of the 32 vector registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kChannelBlock = 6;  // 6 x 2 of 8 lanes: 12 of the 16 vector registers
#else
constexpr int kLanes = 4;
constexpr int kChannelBlock = 4;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

struct Shape {
  int64_t height, width, in_channels, out_channels;
};

// One row's share of a weight gradient: the products x_row[w * x_step + c] * dy_row[w * dy_step + o] for
// w in [0, count) (count 0 where the tap reaches outside the image).
struct RowPair {
  const float* x_row;
  const float* dy_row;
  int64_t count;
};

// The channels and strides of one sum of outer products: out[c * out_stride + o] for C x O channel pairs.
struct Products {
  int64_t in_channels, out_channels, x_step, dy_step, out_stride;
};

// acc[c][v] (CB input channels x NV vectors of output channels) stays in registers while the rows
// [row_begin, row_end) stream past; row_pair(row) says where each row's products are.
template <int CB, int NV, typename RowPairOf>
void Block(const RowPairOf& row_pair, const Products& p, int64_t row_begin, int64_t row_end, int64_t c0, int64_t o0,
           float* out) {
  // Summed from zero and then added to the total: a sum per chunk of rows and a sum of chunks, whose
  // rounding error grows with the chunk's and the chunk count's length, not with the whole batch's.
  Vec acc[CB][NV] = {};
  for (int64_t row = row_begin; row < row_end; ++row) {
    const RowPair pair = row_pair(row);
    const float* x_row = pair.x_row + c0;
    const float* dy_row = pair.dy_row + o0;
    for (int64_t w = 0; w < pair.count; ++w) {
      const float* xp = x_row + w * p.x_step;
      Vec g[NV];
      for (int v = 0; v < NV; ++v) g[v] = Load(dy_row + w * p.dy_step + v * kLanes);
      for (int c = 0; c < CB; ++c) {
        const float xc = xp[c];
        for (int v = 0; v < NV; ++v) acc[c][v] += xc * g[v];
      }
    }
  }
  float* target = out + c0 * p.out_stride + o0;
  for (int c = 0; c < CB; ++c)
    for (int v = 0; v < NV; ++v)
      Store(target + c * p.out_stride + v * kLanes, Load(target + c * p.out_stride + v * kLanes) + acc[c][v]);
}

template <int NV, typename RowPairOf>
void ChannelBlocks(const RowPairOf& row_pair, const Products& p, int64_t row_begin, int64_t row_end, int64_t o0,
                   float* out) {
  int64_t c0 = 0;
  for (; c0 + kChannelBlock <= p.in_channels; c0 += kChannelBlock)
    Block<kChannelBlock, NV>(row_pair, p, row_begin, row_end, c0, o0, out);
  for (; c0 < p.in_channels; ++c0) Block<1, NV>(row_pair, p, row_begin, row_end, c0, o0, out);
}

// Adds the rows [row_begin, row_end)'s outer products into out, every block of channel pairs.
template <typename RowPairOf>
void OuterProducts(const RowPairOf& row_pair, const Products& p, int64_t row_begin, int64_t row_end, float* out) {
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= p.out_channels; o0 += 2 * kLanes) ChannelBlocks<2>(row_pair, p, row_begin, row_end, o0, out);
  for (; o0 < p.out_channels; o0 += kLanes) ChannelBlocks<1>(row_pair, p, row_begin, row_end, o0, out);
}

// Rows of at most ~256 KiB of both operands at a time, so that a chunk stays in cache across every tap
// and channel block: accumulate(begin, end) for each chunk of [row_begin, row_end).
template <typename Accumulate>
void InChunks(int64_t bytes_per_row, int64_t row_begin, int64_t row_end, const Accumulate& accumulate) {
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / bytes_per_row);
  for (int64_t begin = row_begin; begin < row_end; begin += chunk) accumulate(begin, std::min(row_end, begin + chunk));
}

// Adds the rows [row_begin, row_end)'s share of the 3x3 weight gradient into dkernel.
void AccumulateRows(const float* x, const float* dy, float* dkernel, const Shape& s, int64_t row_begin,
                    int64_t row_end) {
  const int64_t H = s.height, W = s.width, C = s.in_channels, O = s.out_channels;
  const Products p{C, O, C, O, O};
  InChunks(W * (C + O) * int64_t{sizeof(float)}, row_begin, row_end, [&](int64_t begin, int64_t end) {
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        // Output column w reads input column w + j - 1, which exists for w in [w_begin, w_end).
        const int64_t w_begin = j == 0 ? 1 : 0;
        const int64_t w_end = j == 2 ? W - 1 : W;
        auto row_pair = [&](int64_t row) {
          const int64_t h = row % H;
          const int64_t h_in = h + i - 1;
          if (h_in < 0 || h_in >= H) return RowPair{x, dy, 0};
          return RowPair{x + ((row - h + h_in) * W + w_begin + j - 1) * C, dy + (row * W + w_begin) * O, w_end - w_begin};
        };
        OuterProducts(row_pair, p, begin, end, dkernel + (i * 3 + j) * C * O);
      }
  });
}

// Work shared between the calling thread and the tasks it schedules on XLA's intra-op pool. Parts are
// claimed from a counter, so the caller never waits for a task that has not started (the pool may be
// busy with other thunks, or with another call of these handlers): it computes unclaimed parts itself.
struct SharedWork {
  std::atomic<int> next_part{0};
  int num_parts = 0;
  int parts_done = 0;
  std::mutex mutex;
  std::condition_variable all_done;
};

// Calls run_part(p) once for each p in [0, num_parts), on the calling thread and up to threads - 1 tasks.
template <typename RunPart>
void RunParts(ffi::ThreadPool& thread_pool, int64_t threads, int num_parts, const RunPart& run_part) {
  auto work = std::make_shared<SharedWork>();
  work->num_parts = num_parts;
  auto run_parts = [work, &run_part]() {
    for (int part; (part = work->next_part.fetch_add(1)) < work->num_parts;) {
      run_part(part);
      std::lock_guard<std::mutex> lock(work->mutex);
      if (++work->parts_done == work->num_parts) work->all_done.notify_all();
    }
  };
  // A task that starts after all parts are claimed touches only `work`, which it co-owns: the check
  // comes before run_parts (and its reference to run_part, which is gone by then) is used.
  for (int64_t t = 1; t < std::min<int64_t>(threads, num_parts); ++t)
    thread_pool.Schedule([work, run_parts]() {
      if (work->next_part.load() < work->num_parts) run_parts();
    });
  run_parts();
  std::unique_lock<std::mutex> lock(work->mutex);
  work->all_done.wait(lock, [&] { return work->parts_done == work->num_parts; });
}

int64_t NumThreads(ffi::ThreadPool& thread_pool) { return std::max<int64_t>(1, thread_pool.num_threads()); }

// Sums accumulate(target, row_begin, row_end) over the rows [0, rows) into out (out_size floats, zeroed
// first). Several parts per thread, claimed as threads come free: XLA may run other thunks on the pool at
// the same time, and a thread that joins late still takes a share. Each part sums into its own buffer and
// the buffers are added in part order, so the result does not depend on which thread ran which part.
template <typename Accumulate>
void SumOverRows(ffi::ThreadPool& thread_pool, int64_t rows, int64_t positions_per_row, int64_t out_size, float* out,
                 const Accumulate& accumulate) {
  std::fill(out, out + out_size, 0.0f);
  const int64_t threads = NumThreads(thread_pool);
  const int64_t max_buffers = std::max<int64_t>(1, (int64_t{32} << 20) / (out_size * int64_t{sizeof(float)}));
  // Each part zeroes and adds a buffer of the output's size: parts under ~2048 positions would spend a
  // noticeable share of their time on that.
  const int64_t worth = std::max(threads, rows * positions_per_row / 2048);
  const int num_parts = static_cast<int>(std::clamp<int64_t>(std::min({4 * threads, worth, rows, max_buffers}), 1, 64));
  std::vector<std::unique_ptr<float[]>> partial(num_parts - 1);
  for (auto& p : partial) p.reset(new float[out_size]);
  RunParts(thread_pool, threads, num_parts, [&](int part) {
    float* target = part == 0 ? out : partial[part - 1].get();
    if (part > 0) std::fill(target, target + out_size, 0.0f);
    accumulate(target, rows * part / num_parts, rows * (part + 1) / num_parts);
  });
  for (const auto& p : partial)
    for (int64_t k = 0; k < out_size; ++k) out[k] += p[k];
}

ffi::Error Conv3x3WeightGradImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                 ffi::ResultBuffer<ffi::F32> dkernel) {
  const auto xd = x.dimensions();
  const auto dyd = dy.dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || xd[0] != dyd[0] || xd[1] != dyd[1] || xd[2] != dyd[2])
    return ffi::Error::InvalidArgument("conv3x3_weight_grad: x (B, H, W, C) and dy (B, H, W, O) must agree in B, H, W");
  const Shape s{xd[1], xd[2], xd[3], dyd[3]};
  if (s.out_channels % kLanes != 0)
    return ffi::Error::InvalidArgument("conv3x3_weight_grad: out_channels must be a multiple of the vector width");
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  SumOverRows(thread_pool, xd[0] * xd[1], s.width, 9 * s.in_channels * s.out_channels, dkernel->typed_data(),
              [&](float* target, int64_t begin, int64_t end) { AccumulateRows(xp, dyp, target, s, begin, end); });
  return ffi::Error::Success();
}

// y[m][v] (MB output positions x NV vectors of output channels) stays in registers while the K
// products of each of the NR input rows stream past: output position w0 + m of row i reads
// rows[i][(w0 + m) * step + k] for k in [0, K) against kernel[(i * K + k) * O + o] (a null row is outside
// the image). The 3x3 convolution: three padded input rows, K = 3C, step C, so that output column w reads
// x[b, h + i - 1, w - 1 .. w + 1, 0 .. C) in the kernel's (j, c) order.
template <int NR, int MB, int NV>
void ForwardBlock(const float* const* rows, int64_t K, int64_t step, const float* kernel, float* y, int64_t O,
                  int64_t w0, int64_t o0) {
  Vec acc[MB][NV] = {};
  for (int i = 0; i < NR; ++i) {
    if (rows[i] == nullptr) continue;
    const float* r = rows[i] + w0 * step;
    const float* k_row = kernel + i * K * O + o0;
    for (int64_t k = 0; k < K; ++k) {
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load(k_row + k * O + v * kLanes);
      for (int m = 0; m < MB; ++m) {
        const float xm = r[m * step + k];
        for (int v = 0; v < NV; ++v) acc[m][v] += xm * wv[v];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) Store(y + (w0 + m) * O + o0 + v * kLanes, acc[m][v]);
}

#if defined(__AVX512F__)
constexpr int kPositionBlock = 12;  // 12 x 2 accumulators and 2 kernel vectors: 26 of 32 registers
#else
constexpr int kPositionBlock = 6;   // 6 x 2 accumulators and 2 kernel vectors: 14 of 16 registers
#endif

// One output row of W positions and O channels (a multiple of the vector width) from NR input rows.
template <int NR>
void ForwardRow(const float* const* rows, int64_t K, int64_t step, const float* kernel, float* y_row, int64_t W,
                int64_t O) {
  auto vectors = [&](auto nv, int64_t o0) {
    constexpr int NV = decltype(nv)::value;
    int64_t w0 = 0;
    for (; w0 + kPositionBlock <= W; w0 += kPositionBlock)
      ForwardBlock<NR, kPositionBlock, NV>(rows, K, step, kernel, y_row, O, w0, o0);
    for (; w0 + 4 <= W; w0 += 4) ForwardBlock<NR, 4, NV>(rows, K, step, kernel, y_row, O, w0, o0);
    for (; w0 < W; ++w0) ForwardBlock<NR, 1, NV>(rows, K, step, kernel, y_row, O, w0, o0);
  };
  int64_t o0 = 0;
  for (; o0 + 2 * kLanes <= O; o0 += 2 * kLanes) vectors(std::integral_constant<int, 2>(), o0);
  for (; o0 < O; o0 += kLanes) vectors(std::integral_constant<int, 1>(), o0);
}

// Calls rows_of(begin, end) for parts [begin, end) of the rows [0, rows), shared by the pool's threads
// (each row is written by one part: no sums across parts).
template <typename RowsOf>
void InRowParts(ffi::ThreadPool& thread_pool, int64_t rows, const RowsOf& rows_of) {
  const int64_t threads = NumThreads(thread_pool);
  const int num_parts = static_cast<int>(std::clamp<int64_t>(std::min(4 * threads, rows), 1, 64));
  RunParts(thread_pool, threads, num_parts,
           [&](int part) { rows_of(rows * part / num_parts, rows * (part + 1) / num_parts); });
}

ffi::Error Conv3x3Impl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto kd = kernel.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[2] != xd[3])
    return ffi::Error::InvalidArgument("conv3x3: x must be (B, H, W, C) and kernel (3, 3, C, O)");
  const int64_t H = xd[1], W = xd[2], C = xd[3], O = kd[3];
  if (O % kLanes != 0)
    return ffi::Error::InvalidArgument("conv3x3: out_channels must be a multiple of the vector width");
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  InRowParts(thread_pool, xd[0] * H, [&](int64_t begin, int64_t end) {
    // Three input rows with a zero pixel at either end, so that every output column reads 3C floats.
    std::vector<float> padded(3 * (W + 2) * C, 0.0f);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % H;
      const float* padded_rows[3];
      for (int i = 0; i < 3; ++i) {
        const int64_t h_in = h + i - 1;
        padded_rows[i] = nullptr;
        if (h_in < 0 || h_in >= H) continue;
        float* dst = padded.data() + i * (W + 2) * C;
        std::memcpy(dst + C, xp + (row - h + h_in) * W * C, W * C * sizeof(float));
        padded_rows[i] = dst;
      }
      ForwardRow<3>(padded_rows, 3 * C, C, kp, yp + row * W * O, W, O);
    }
  });
  return ffi::Error::Success();
}

// Small maps (8x8 pixels and less): a row holds too few pixels to fill a block of positions, and the
// zero padding is a large share of the products (16% at 8x8, 31% at 4x4, 56% at 2x2).
//
//   Conv3x3AcrossImages(x, kernel)           the same y as Conv3x3(x, kernel)
//   Conv3x3AcrossImagesInputGrad(dy, kernel)  dx = Conv3x3(dy, kernel flipped in space, channel axes swapped),
//                                             the input gradient of Conv3x3(x, kernel), without the flipped
//                                             kernel's copy
//
// A block of output positions is the same pixel of MB consecutive images, which share their valid
// taps: each valid kernel row i is one run of K products, the input's taps (i, j0 .. j1) of that pixel
// (contiguous in NHWC) against kernel rows (i, j0 .. j1, all c). The runs come in Conv3x3's order (i,
// then j, then c) without the padding's zero products, so the sums are the same floats. The kernel is
// first copied into panels of 16 output channels (each a (9C, 16) matrix, rows in (i, j, c) order), so
// that a run reads each vector's kernel rows in one stream: in the (3, 3, C, O) kernel they are O floats
// apart, a new page every few rows once O reaches 256. (XLA's transpose makes the same copy 10x slower,
// and a sampling loop does not hoist it.)
constexpr int64_t kPanelWidth = 16;

struct TapRun {
  int64_t x_offset, kernel_row, count;
};

template <int MB, int NV>
void AcrossImagesBlock(const float* x, int64_t x_step, const TapRun* runs, int num_runs,
                       const float* const* panel_columns, float* y, int64_t y_step) {
  Vec acc[MB][NV] = {};
  for (int r = 0; r < num_runs; ++r) {
    const float* xr = x + runs[r].x_offset;
    const float* k_run[NV];
    for (int v = 0; v < NV; ++v) k_run[v] = panel_columns[v] + runs[r].kernel_row * kPanelWidth;
    const int64_t K = runs[r].count;
    for (int64_t k = 0; k < K; ++k) {
      Vec wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = Load(k_run[v] + k * kPanelWidth);
      for (int m = 0; m < MB; ++m) {
        const float xm = xr[m * x_step + k];
        for (int v = 0; v < NV; ++v) acc[m][v] += xm * wv[v];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NV; ++v) Store(y + m * y_step + v * kLanes, acc[m][v]);
}

// y (B, H, W, O) from x (B, H, W, C) and the kernel's panels (O / 16 of (9C, 16)), as described above.
void AcrossImages(ffi::ThreadPool& thread_pool, const float* xp, int64_t B, int64_t H, int64_t W, int64_t C,
                  const float* pp, int64_t O, float* yp) {
  // Each pixel's runs: at most three kernel rows.
  std::vector<TapRun> runs(3 * H * W);
  std::vector<int> num_runs(H * W, 0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      const int64_t j0 = w == 0 ? 1 : 0, j1 = w == W - 1 ? 1 : 2;
      for (int64_t i = 0; i < 3; ++i) {
        const int64_t h_in = h + i - 1;
        if (h_in < 0 || h_in >= H) continue;
        runs[3 * (h * W + w) + num_runs[h * W + w]++] =
            TapRun{(h_in * W + w + j0 - 1) * C, (i * 3 + j0) * C, (j1 - j0 + 1) * C};
      }
    }
  // Blocks of images: as many of kPositionBlock as fit, then of 4, then single images.
  std::vector<std::pair<int64_t, int>> image_blocks;
  for (int64_t b = 0; b < B;) {
    const int mb = B - b >= kPositionBlock ? kPositionBlock : B - b >= 4 ? 4 : 1;
    image_blocks.emplace_back(b, mb);
    b += mb;
  }
  // Blocks of output channels: two vectors, then one for the rest.
  std::vector<int64_t> channel_blocks;
  for (int64_t o0 = 0; o0 < O; o0 += O - o0 >= 2 * kLanes ? 2 * kLanes : kLanes) channel_blocks.push_back(o0);
  const int64_t items = H * W * static_cast<int64_t>(image_blocks.size());
  const int64_t num_blocks = static_cast<int64_t>(channel_blocks.size());
  const int64_t x_step = H * W * C, y_step = H * W * O;
  // Parts split the items (pixels of image blocks) and the channel blocks. A part reads its blocks'
  // panels once per item and its items' inputs once per channel block: split the items only as far as
  // needed to keep a part's inputs in cache (~512 KiB), and the channel blocks the rest of the way, so
  // that a large kernel on a small input (512 channels on 2x2 maps) is read about once, not once per part.
  const int64_t threads = NumThreads(thread_pool);
  const int64_t num_parts = std::clamp<int64_t>(4 * threads, 1, 64);
  const int64_t x_bytes = B * x_step * static_cast<int64_t>(sizeof(float));
  const int64_t item_parts =
      std::clamp<int64_t>((x_bytes + (512 << 10) - 1) / (512 << 10), 1, std::min(num_parts, items));
  const int64_t block_parts = std::clamp<int64_t>(num_parts / item_parts, 1, num_blocks);
  RunParts(thread_pool, threads, static_cast<int>(item_parts * block_parts), [&](int part) {
    const int64_t item_part = part % item_parts, block_part = part / item_parts;
    const int64_t begin = items * item_part / item_parts, end = items * (item_part + 1) / item_parts;
    auto vectors = [&](auto nv, int64_t o0) {
      constexpr int NV = decltype(nv)::value;
      const float* panel_columns[NV];
      for (int v = 0; v < NV; ++v) {
        const int64_t o = o0 + v * kLanes;
        panel_columns[v] = pp + (o / kPanelWidth) * 9 * C * kPanelWidth + o % kPanelWidth;
      }
      for (int64_t item = begin; item < end; ++item) {
        const int64_t pixel = item % (H * W);
        const auto [b0, mb] = image_blocks[item / (H * W)];
        const TapRun* pixel_runs = runs.data() + 3 * pixel;
        const float* xb = xp + b0 * x_step;
        float* yb = yp + b0 * y_step + pixel * O + o0;
        if (mb == kPositionBlock)
          AcrossImagesBlock<kPositionBlock, NV>(xb, x_step, pixel_runs, num_runs[pixel], panel_columns, yb, y_step);
        else if (mb == 4)
          AcrossImagesBlock<4, NV>(xb, x_step, pixel_runs, num_runs[pixel], panel_columns, yb, y_step);
        else
          AcrossImagesBlock<1, NV>(xb, x_step, pixel_runs, num_runs[pixel], panel_columns, yb, y_step);
      }
    };
    for (int64_t blk = num_blocks * block_part / block_parts; blk < num_blocks * (block_part + 1) / block_parts;
         ++blk) {
      const int64_t o0 = channel_blocks[blk];
      if (O - o0 >= 2 * kLanes)
        vectors(std::integral_constant<int, 2>(), o0);
      else
        vectors(std::integral_constant<int, 1>(), o0);
    }
  });
}

// The panels of the kernel the convolution multiplies, (3, 3, C, O) as (9C, O), or with flipped set, of
// that kernel flipped in space with its channel axes swapped: (9O, C), row (i, j, o), column c holding
// kernel[2 - i, 2 - j, c, o]. Rows are read in order; the flipped copy writes each source row's floats 16
// apart, within the (O, 16) block of one tap and panel, which stays in the first-level cache.
std::vector<float> Panels(ffi::ThreadPool& thread_pool, const float* kp, int64_t C, int64_t O, bool flipped) {
  std::vector<float> panels(9 * C * O);
  float* pp = panels.data();
  if (!flipped) {
    InRowParts(thread_pool, 9 * C, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t p = 0; p < O / kPanelWidth; ++p)
          std::memcpy(pp + (p * 9 * C + r) * kPanelWidth, kp + r * O + p * kPanelWidth, kPanelWidth * sizeof(float));
    });
  } else {
    // Panel p covers columns c = 16p .. 16p + 15 of the (9O, C) matrix; (tap t, panel p) is one block.
    InRowParts(thread_pool, 9 * (C / kPanelWidth), [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t t = block / (C / kPanelWidth), p = block % (C / kPanelWidth);
        float* dst = pp + (p * 9 * O + t * O) * kPanelWidth;
        for (int64_t l = 0; l < kPanelWidth; ++l) {
          const float* src = kp + ((8 - t) * C + p * kPanelWidth + l) * O;
          for (int64_t o = 0; o < O; ++o) dst[o * kPanelWidth + l] = src[o];
        }
      }
    });
  }
  return panels;
}

// The handlers' checks: x (B, H, W, Cx) and a kernel (3, 3, C, O) whose channels the convolution reads
// (C, or O with flipped) match x's and whose written channels fill panels.
ffi::Error AcrossImagesHandler(ffi::ThreadPool& thread_pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::F32>& kernel,
                               ffi::ResultBuffer<ffi::F32>& y, bool flipped) {
  const auto xd = x.dimensions();
  const auto kd = kernel.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || kd[0] != 3 || kd[1] != 3 || kd[flipped ? 3 : 2] != xd[3])
    return ffi::Error::InvalidArgument(flipped ? "conv3x3 input grad: dy must be (B, H, W, O) and kernel (3, 3, C, O)"
                                               : "conv3x3: x must be (B, H, W, C) and kernel (3, 3, C, O)");
  const int64_t written = flipped ? kd[2] : kd[3];
  if (written % kPanelWidth != 0 || kPanelWidth % kLanes != 0)
    return ffi::Error::InvalidArgument("conv3x3: the channels written must be a multiple of 16");
  const std::vector<float> panels = Panels(thread_pool, kernel.typed_data(), kd[2], kd[3], flipped);
  AcrossImages(thread_pool, x.typed_data(), xd[0], xd[1], xd[2], xd[3], panels.data(), written, y->typed_data());
  return ffi::Error::Success();
}

ffi::Error Conv3x3AcrossImagesImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x,
                                   ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y) {
  return AcrossImagesHandler(thread_pool, x, kernel, y, false);
}

ffi::Error Conv3x3AcrossImagesInputGradImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> dy,
                                            ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> dx) {
  return AcrossImagesHandler(thread_pool, dy, kernel, dx, true);
}

// The 2x2 stride-2 transposed convolution's two gradients, with the kernel as two "row kernels" (one per
// output row parity a, as ddpm_jax.cpu.layers.upconv2x2_matmul multiplies): output row 2h + a of image
// b is x[b, h] (W x C) times row_kernels[a] (C x 2O), whose columns (b', o) are the output pixels
// (2w + b', o) of input pixel w. Both read the output gradient dy (B, 2H, 2W, O) in place: its row 2h + a
// holds input pixel w's 2O columns at [w * 2O, (w + 1) * 2O).
//
//   UpConv2x2WeightGrad(x, dy)            drow_kernels[a, c, k] = sum over b, h, w of x[b, h, w, c] * dy_a[b, h, w, k]
//   UpConv2x2InputGrad(dy, row_kernels_t) dx[b, h, w, c] = sum over a, k of dy_a[b, h, w, k] * row_kernels_t[a, k, c]
//
// with dy_a[b, h, w, k] = dy[b, 2h + a, 2w + k / O, k % O] and row_kernels_t[a] = row_kernels[a]^T. XLA
// computes the first as products contracting both operands' major axes after copying each parity's rows
// out, at a fraction of its matmul rate.
ffi::Error UpConv2x2WeightGradImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> drow_kernels) {
  const auto xd = x.dimensions();
  const auto dyd = dy.dimensions();
  if (xd.size() != 4 || dyd.size() != 4 || xd[0] != dyd[0] || 2 * xd[1] != dyd[1] || 2 * xd[2] != dyd[2])
    return ffi::Error::InvalidArgument("upconv2x2_weight_grad: x must be (B, H, W, C) and dy (B, 2H, 2W, O)");
  const int64_t W = xd[2], C = xd[3], K = 2 * dyd[3];
  if (K % kLanes != 0)
    return ffi::Error::InvalidArgument("upconv2x2_weight_grad: 2 * out_channels must be a multiple of the vector width");
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  const Products p{C, K, C, K, K};
  SumOverRows(thread_pool, xd[0] * xd[1], W, 2 * C * K, drow_kernels->typed_data(),
              [&](float* target, int64_t row_begin, int64_t row_end) {
    InChunks(W * (C + 2 * K) * int64_t{sizeof(float)}, row_begin, row_end, [&](int64_t begin, int64_t end) {
      for (int a = 0; a < 2; ++a) {
        auto row_pair = [&](int64_t row) { return RowPair{xp + row * W * C, dyp + (2 * row + a) * W * K, W}; };
        OuterProducts(row_pair, p, begin, end, target + a * C * K);
      }
    });
  });
  return ffi::Error::Success();
}

ffi::Error UpConv2x2InputGradImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> dy,
                                  ffi::Buffer<ffi::F32> row_kernels_t, ffi::ResultBuffer<ffi::F32> dx) {
  const auto dyd = dy.dimensions();
  const auto kd = row_kernels_t.dimensions();
  if (dyd.size() != 4 || kd.size() != 3 || kd[0] != 2 || kd[1] != 2 * dyd[3] || dyd[1] % 2 || dyd[2] % 2)
    return ffi::Error::InvalidArgument("upconv2x2_input_grad: dy must be (B, 2H, 2W, O) and row_kernels_t (2, 2O, C)");
  const int64_t W = dyd[2] / 2, K = kd[1], C = kd[2];
  if (C % kLanes != 0)
    return ffi::Error::InvalidArgument("upconv2x2_input_grad: in_channels must be a multiple of the vector width");
  const float* dyp = dy.typed_data();
  const float* kp = row_kernels_t.typed_data();
  float* dxp = dx->typed_data();
  InRowParts(thread_pool, dyd[0] * (dyd[1] / 2), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* parity_rows[2] = {dyp + 2 * row * W * K, dyp + (2 * row + 1) * W * K};
      ForwardRow<2>(parity_rows, K, K, kp, dxp + row * W * C, W, C);
    }
  });
  return ffi::Error::Success();
}

// Sums of a and of a * (b - shift) over rows [row_begin, row_end) of (rows, C) arrays, into sum0 and sum1
// (C doubles each). Float sums over blocks of at most kMomentBlock rows, added into double totals: the
// block sums vectorize, and the rounding error grows with the block's length, not with the array's.
constexpr int64_t kMomentBlock = 64;

void AccumulateMoments(const float* a, const float* b, const float* shift, int64_t C, int64_t row_begin,
                       int64_t row_end, double* sum0, double* sum1) {
  std::vector<float> block0(C), block1(C);
  for (int64_t begin = row_begin; begin < row_end; begin += kMomentBlock) {
    const int64_t end = std::min(row_end, begin + kMomentBlock);
    std::fill(block0.begin(), block0.end(), 0.0f);
    std::fill(block1.begin(), block1.end(), 0.0f);
    float* __restrict s0 = block0.data();
    float* __restrict s1 = block1.data();
    for (int64_t n = begin; n < end; ++n) {
      const float* __restrict an = a + n * C;
      const float* __restrict bn = b + n * C;
      for (int64_t c = 0; c < C; ++c) {
        s0[c] += an[c];
        s1[c] += an[c] * (bn[c] - shift[c]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum0[c] += s0[c];
      sum1[c] += s1[c];
    }
  }
}

ffi::Error ChannelMomentsImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                              ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> moments) {
  const auto ad = a.dimensions();
  const auto bd = b.dimensions();
  const auto sd = shift.dimensions();
  if (ad.size() < 1 || ad.size() != bd.size() || !std::equal(ad.begin(), ad.end(), bd.begin()) || sd.size() != 1 ||
      sd[0] != ad[ad.size() - 1])
    return ffi::Error::InvalidArgument("channel_moments: a and b must have one shape (..., C) and shift (C,)");
  const int64_t C = sd[0];
  const int64_t rows = C == 0 ? 0 : a.element_count() / C;
  const int64_t threads = NumThreads(thread_pool);
  // Parts of at least ~16,000 floats: below that, waking a thread costs more than it saves.
  const int64_t worth = std::max<int64_t>(1, rows * C / 16384);
  const int num_parts = static_cast<int>(std::clamp<int64_t>(std::min({4 * threads, worth, rows}), 1, 64));
  // Each part sums into its own totals, added in part order: the result does not depend on which thread ran
  // which part (the parts themselves depend on the pool's size, as in Conv3x3WeightGradImpl).
  std::vector<double> totals(2 * C * num_parts, 0.0);
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  const float* sp = shift.typed_data();
  RunParts(thread_pool, threads, num_parts, [&](int part) {
    double* sum0 = totals.data() + 2 * C * part;
    AccumulateMoments(ap, bp, sp, C, rows * part / num_parts, rows * (part + 1) / num_parts, sum0, sum0 + C);
  });
  float* out = moments->typed_data();
  for (int64_t k = 0; k < 2 * C; ++k) {
    double total = 0.0;
    for (int part = 0; part < num_parts; ++part) total += totals[2 * C * part + k];
    out[k] = static_cast<float>(total);
  }
  return ffi::Error::Success();
}

// ExampleChannelSums(a)  sums[b, c] = sum over positions p of a[b, p, c], for a (B, ..., C) array: the
// gradient of a per-example, per-channel bias (a block's time embedding), in one pass over a. XLA
// computes it as a product with a vector of ones after copying a into (B, C, positions) order.
ffi::Error ExampleChannelSumsImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> a,
                                  ffi::ResultBuffer<ffi::F32> sums) {
  const auto ad = a.dimensions();
  if (ad.size() < 2) return ffi::Error::InvalidArgument("example_channel_sums: a must be (B, ..., C)");
  const int64_t B = ad[0], C = ad[ad.size() - 1];
  const int64_t positions = B * C == 0 ? 0 : a.element_count() / (B * C);
  const float* ap = a.typed_data();
  float* out = sums->typed_data();
  const std::vector<float> no_shift(C, 0.0f);
  InRowParts(thread_pool, B, [&](int64_t begin, int64_t end) {
    std::vector<double> total(C), unused(C);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(total.begin(), total.end(), 0.0);
      // The second sum (of a * a) comes along unused: the pass is bound by reading a either way.
      const float* example = ap + b * positions * C;
      AccumulateMoments(example, example, no_shift.data(), C, 0, positions, total.data(), unused.data());
      for (int64_t c = 0; c < C; ++c) out[b * C + c] = static_cast<float>(total[c]);
    }
  });
  return ffi::Error::Success();
}

// The convolutions' handlers: XLA's thread pool, two float32 arrays in, one out.
auto TwoArraysToOne() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<
      ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3, Conv3x3Impl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3AcrossImages, Conv3x3AcrossImagesImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3AcrossImagesInputGrad, Conv3x3AcrossImagesInputGradImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Conv3x3WeightGrad, Conv3x3WeightGradImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(UpConv2x2WeightGrad, UpConv2x2WeightGradImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(UpConv2x2InputGrad, UpConv2x2InputGradImpl, TwoArraysToOne());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ExampleChannelSums, ExampleChannelSumsImpl,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<
                                  ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ChannelMoments, ChannelMomentsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
