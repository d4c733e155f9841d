// Runs the CUDA backend's GEMM problems on the CPU, tile by tile, the way the
// kernel walks them: the same builders (op_problems.h), the same tile plan, the
// same index maps (gemm_problem.h), with float accumulation.  Every operand read
// is checked to lie inside its tensor and every output element is counted, so
// the tests see out-of-bounds reads, missed outputs and double writes.

#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "op_problems.h"

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using namespace spa_cuda;

struct Extent {
  const char* name;
  const float* begin;
  int64_t size;
};

struct Emulation {
  std::vector<Extent> inputs;       // readable ranges
  std::vector<Tensor> outputs;      // writable tensors
  std::vector<Tensor> write_counts;  // one int32 tensor per output
  TileShape shape{16, 8, 16};

  void readable(const char* name, const Tensor& t) { inputs.push_back({name, t.data_ptr<float>(), t.numel()}); }
  void writable(const Tensor& t) {
    outputs.push_back(t);
    write_counts.push_back(at::zeros({t.numel()}, at::kInt));
    readable("output", t);  // intermediates are read back
  }

  float read(const OperandMap& op, int64_t offset) const {
    const float* base = static_cast<const float*>(op.data);
    for (const Extent& e : inputs)
      if (base >= e.begin && base < e.begin + std::max<int64_t>(e.size, 1)) {
        const int64_t at = (base - e.begin) + offset;
        if (at < 0 || at >= e.size) throw std::out_of_range(std::string("read outside ") + e.name);
        return base[offset];
      }
    throw std::out_of_range("read from an unknown tensor");
  }

  void write(void* data, int64_t offset, float value) {
    float* base = static_cast<float*>(data);
    for (size_t i = 0; i < outputs.size(); ++i) {
      float* begin = outputs[i].data_ptr<float>();
      if (base + offset >= begin && base + offset < begin + outputs[i].numel()) {
        base[offset] = value;
        write_counts[i].data_ptr<int32_t>()[base + offset - begin] += 1;
        return;
      }
    }
    throw std::out_of_range("write outside every output");
  }

  static float round_to_bfloat16(float v) {  // what a 16-bit split keeps in its hi half
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000u;
    std::memcpy(&v, &bits, 4);
    return v;
  }

  void store(const OutputMap& out, int64_t offset, float value) {
    if (out.split_offset == 0) return write(out.data, offset, value);
    const float hi = round_to_bfloat16(value);
    write(out.data, offset, hi);
    write(out.data, offset + out.split_offset, value - hi);
  }

  void run(const GemmProblem& p) {
    const TilePlan plan = make_tile_plan(p, shape);
    for (int64_t tile = 0; tile < plan.total_tiles; ++tile) {
      const TileCoordinate c = tile_coordinate(plan, tile);
      if (c.zero) {
        zero_tile(p.output, c.row_tile, c.col_tile);
        continue;
      }
      for (int64_t i = 0; i < shape.block_m; ++i)
        for (int64_t j = 0; j < shape.block_n; ++j) {
          const int64_t m = c.row_tile * shape.block_m + i, n = c.col_tile * shape.block_n + j;
          if (m >= p.m || n >= p.n) continue;
          float acc = 0.0f;
          for (int phase = 0; phase < p.phases; ++phase) {
            const AxisPoint ra = axis_point(p.a[phase].rows, m), rb = axis_point(p.b[phase].rows, n);
            for (int64_t k = 0; k < p.k[phase]; ++k) {
              const int64_t oa = element_offset(p.a[phase], ra, axis_point(p.a[phase].depth, k));
              const int64_t ob = element_offset(p.b[phase], rb, axis_point(p.b[phase].depth, k));
              if (oa >= 0 && ob >= 0) acc += read(p.a[phase], oa) * read(p.b[phase], ob);
            }
          }
          float bias = 0.0f;
          if (p.output.bias != nullptr) {
            const int64_t outer = n / inner_points(p.output.cols);
            const int64_t channel = p.output.cols.index ? p.output.cols.index[outer] : outer;
            bias = static_cast<const float*>(p.output.bias)[channel];
          }
          const int64_t offset = axis_point(p.output.rows, m).offset + axis_point(p.output.cols, n).offset;
          store(p.output, offset, p.output.alpha * acc + bias);
        }
    }
  }

  void zero_tile(const OutputMap& out, int64_t row_tile, int64_t col_tile) {
    const int64_t full_rows = out.rows.full_count * inner_points(out.rows);
    const int64_t full_cols = out.cols.full_count * inner_points(out.cols);
    const int64_t r0 = row_tile * shape.block_m, c0 = col_tile * shape.block_n;
    const int64_t r_end = std::min(r0 + shape.block_m, full_rows), c_end = std::min(c0 + shape.block_n, full_cols);
    if (zero_tile_fully_active(out, r0, r_end, c0, c_end)) return;
    for (int64_t r = r0; r < r_end; ++r)
      for (int64_t c = c0; c < c_end; ++c)
        if (!(full_position_is_active(out.rows, r) && full_position_is_active(out.cols, c))) {
          const int64_t offset = axis_point(out.rows, r, false).offset + axis_point(out.cols, c, false).offset;
          write(out.data, offset, 0.0f);
          if (out.split_offset != 0) write(out.data, offset + out.split_offset, 0.0f);
        }
  }
};

const int32_t* index_or_null(const OptionalTensor& idx) {
  return idx ? index_list(idx->data_ptr<int32_t>(), idx->numel()) : nullptr;
}
const void* data_or_null(const OptionalTensor& t) { return t ? t->data_ptr() : nullptr; }
Tensor nan_filled(at::IntArrayRef shape) { return at::full(shape, NAN, at::kFloat); }

void add_inputs(Emulation& e, const std::vector<std::pair<const char*, OptionalTensor>>& tensors) {
  for (const auto& [name, t] : tensors)
    if (t) e.readable(name, *t);
}

void raise_if(const std::string& problem) {
  if (!problem.empty()) throw std::invalid_argument(problem);
}

LinearArgs linear_args(const Tensor& x, const Tensor& w, const OptionalTensor& a, const OptionalTensor& b,
                       const OptionalTensor& bias, const OptionalTensor& in_idx, const OptionalTensor& out_idx,
                       double scale, bool split) {
  LinearArgs args;
  args.x = x.data_ptr();
  args.weight = w.data_ptr();
  args.lora_a = data_or_null(a);
  args.lora_b = data_or_null(b);
  args.bias = data_or_null(bias);
  args.in_idx = index_or_null(in_idx);
  args.out_idx = index_or_null(out_idx);
  args.rows = x.size(0);
  args.in_features = x.size(1);
  args.out_features = w.size(0);
  args.rank = a ? a->size(0) : 0;
  args.active_in = in_idx ? in_idx->numel() : args.in_features;
  args.active_out = out_idx ? out_idx->numel() : args.out_features;
  args.scale = float(scale);
  args.element_bytes = 4;
  args.split_intermediate = split;
  return args;
}

// Returns [outputs..., write counts...]; inputs are contiguous float32 CPU tensors.
std::vector<Tensor> linear(const Tensor& x, const Tensor& w, const OptionalTensor& a, const OptionalTensor& b,
                           const OptionalTensor& bias, const OptionalTensor& in_idx, const OptionalTensor& out_idx,
                           double scale, bool split, std::vector<int64_t> tile, const OptionalTensor& grad_out,
                           std::vector<bool> mask) {
  const LinearArgs args = linear_args(x, w, a, b, bias, in_idx, out_idx, scale, split);
  raise_if(check_linear_args(args));
  Emulation e;
  e.shape = TileShape{int(tile[0]), int(tile[1]), int(tile[2])};
  add_inputs(e, {{"x", x}, {"weight", w}, {"lora_a", a}, {"lora_b", b}, {"bias", bias}, {"grad_out", grad_out}});
  const int64_t width = intermediate_width(args.rank, split);
  Tensor u = nan_filled({args.rows, width}), t = nan_filled({args.rows, width});
  Tensor one = at::ones({1}, at::kFloat);
  e.readable("one", one);
  e.writable(u);
  e.writable(t);
  std::vector<Tensor> results;
  ProblemList list;
  if (!grad_out) {
    Tensor y = nan_filled({args.rows, args.out_features});
    e.writable(y);
    results.push_back(y);
    list = linear_forward_problems(args, y.data_ptr(), t.data_ptr());
  } else {
    const std::vector<std::vector<int64_t>> shapes = {
        {args.rows, args.in_features}, {args.out_features, args.in_features}, {args.rank, args.in_features},
        {args.out_features, args.rank}, {args.out_features}};
    Gradients g;
    void** slots[5] = {&g.grad_x, &g.grad_weight, &g.grad_lora_a, &g.grad_lora_b, &g.grad_bias};
    for (int i = 0; i < 5; ++i) {
      Tensor out = mask[i] ? nan_filled(shapes[i]) : at::empty({0}, at::kFloat);
      if (mask[i]) {
        e.writable(out);
        *slots[i] = out.data_ptr();
      }
      results.push_back(out);
    }
    list = linear_backward_problems(args, grad_out->data_ptr(), g, u.data_ptr(), t.data_ptr(), one.data_ptr());
  }
  for (int i = 0; i < list.count; ++i) e.run(list.problems[i]);
  for (size_t i = 2; i < e.outputs.size(); ++i) results.push_back(e.write_counts[i]);
  return results;
}

ConvArgs conv_args(const Tensor& x, const Tensor& w, const OptionalTensor& a, const OptionalTensor& b,
                   const OptionalTensor& p, const OptionalTensor& bias, const OptionalTensor& in_idx,
                   const OptionalTensor& out_idx, double scale, bool split, const std::vector<int64_t>& stride,
                   const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  ConvArgs args;
  const int64_t d = x.dim() - 2;
  args.x = x.data_ptr();
  args.weight = w.data_ptr();
  args.lora_a = data_or_null(a);
  args.lora_b = data_or_null(b);
  args.adapter = data_or_null(p);
  args.bias = data_or_null(bias);
  args.in_idx = index_or_null(in_idx);
  args.out_idx = index_or_null(out_idx);
  args.batch = x.size(0);
  args.in_channels = x.size(1);
  args.out_channels = w.size(0);
  args.rank = a ? a->size(0) : 0;
  args.active_in = in_idx ? in_idx->numel() : args.in_channels;
  args.active_out = out_idx ? out_idx->numel() : args.out_channels;
  for (int64_t i = 0; i < d; ++i) {
    const int slot = int(kSpatialDims - d + i);
    args.input[slot] = int32_t(x.size(2 + i));
    args.kernel[slot] = int32_t(w.size(2 + i));
    args.stride[slot] = int32_t(stride[i]);
    args.padding[slot] = int32_t(padding[i]);
    args.dilation[slot] = int32_t(dilation[i]);
    args.output[slot] = int32_t((x.size(2 + i) + 2 * padding[i] - dilation[i] * (w.size(2 + i) - 1) - 1) / stride[i] + 1);
  }
  args.scale = float(scale);
  args.element_bytes = 4;
  args.split_intermediate = split;
  return args;
}

std::vector<Tensor> conv(const Tensor& x, const Tensor& w, const OptionalTensor& a, const OptionalTensor& b,
                         const OptionalTensor& p, const OptionalTensor& bias, const OptionalTensor& in_idx,
                         const OptionalTensor& out_idx, double scale, bool split, std::vector<int64_t> stride,
                         std::vector<int64_t> padding, std::vector<int64_t> dilation, std::vector<int64_t> tile,
                         const OptionalTensor& grad_out, std::vector<bool> mask) {
  const ConvArgs args = conv_args(x, w, a, b, p, bias, in_idx, out_idx, scale, split, stride, padding, dilation);
  raise_if(check_conv_args(args));
  Emulation e;
  e.shape = TileShape{int(tile[0]), int(tile[1]), int(tile[2])};
  add_inputs(e, {{"x", x}, {"weight", w}, {"lora_a", a}, {"lora_b", b}, {"adapter", p}, {"bias", bias},
                 {"grad_out", grad_out}});
  const int64_t positions = args.batch * int64_t(args.output[0]) * args.output[1] * args.output[2];
  const int64_t width = intermediate_width(args.rank, split);
  Tensor u = nan_filled({positions, width}), t = nan_filled({positions, width});
  Tensor one = at::ones({1}, at::kFloat);
  e.readable("one", one);
  e.writable(u);
  e.writable(t);
  std::vector<Tensor> results;
  ProblemList list;
  if (!grad_out) {
    std::vector<int64_t> shape = {args.batch, args.out_channels};
    for (int64_t i = kSpatialDims - (x.dim() - 2); i < kSpatialDims; ++i) shape.push_back(args.output[i]);
    Tensor y = nan_filled(shape);
    e.writable(y);
    results.push_back(y);
    list = conv_forward_problems(args, y.data_ptr(), t.data_ptr());
  } else {
    const std::vector<at::IntArrayRef> shapes = {x.sizes(), w.sizes(), a ? a->sizes() : at::IntArrayRef{0},
                                                 b ? b->sizes() : at::IntArrayRef{0},
                                                 p ? p->sizes() : at::IntArrayRef{0}};
    Gradients g;
    void** slots[6] = {&g.grad_x, &g.grad_weight, &g.grad_lora_a, &g.grad_lora_b, &g.grad_adapter, &g.grad_bias};
    for (int i = 0; i < 6; ++i) {
      const bool want = mask[i];
      Tensor out = want ? (i == 5 ? nan_filled({args.out_channels}) : nan_filled(shapes[i])) : at::empty({0}, at::kFloat);
      if (want) {
        e.writable(out);
        *slots[i] = out.data_ptr();
      }
      results.push_back(out);
    }
    list = conv_backward_problems(args, grad_out->data_ptr(), g, u.data_ptr(), t.data_ptr(), one.data_ptr());
  }
  for (int i = 0; i < list.count; ++i) e.run(list.problems[i]);
  for (size_t i = 2; i < e.outputs.size(); ++i) results.push_back(e.write_counts[i]);
  return results;
}

// The tile plan of a linear forward's main problem, for the launch-geometry tests.
std::vector<int64_t> linear_forward_plan(int64_t rows, int64_t in_features, int64_t out_features, int64_t active_out,
                                         std::vector<int64_t> tile) {
  static const int32_t fake_index[1] = {0};  // never read: planning looks at counts only
  LinearArgs args;
  args.rows = rows;
  args.in_features = in_features;
  args.out_features = out_features;
  args.active_in = in_features;
  args.out_idx = active_out < out_features ? fake_index : nullptr;
  args.active_out = active_out;
  const ProblemList list = linear_forward_problems(args, nullptr, nullptr);
  const TilePlan plan = make_tile_plan(list.problems[list.count - 1], TileShape{int(tile[0]), int(tile[1]), int(tile[2])});
  return {plan.row_tiles, plan.col_tiles, plan.active_tiles, plan.zero_row_tiles, plan.zero_col_tiles,
          plan.zero_tiles, plan.total_tiles, grid_blocks(plan)};
}

std::string check_linear(int64_t rows, int64_t in_features, int64_t out_features, int64_t rank, int64_t active_in,
                         int64_t active_out, bool has_in_idx, bool has_out_idx, bool has_lora, int element_bytes) {
  static const int32_t fake_index[1] = {0};
  static const float fake[1] = {0};
  LinearArgs args;
  args.rows = rows;
  args.in_features = in_features;
  args.out_features = out_features;
  args.rank = rank;
  args.active_in = active_in;
  args.active_out = active_out;
  args.in_idx = has_in_idx ? fake_index : nullptr;
  args.out_idx = has_out_idx ? fake_index : nullptr;
  args.lora_a = has_lora ? fake : nullptr;
  args.lora_b = has_lora ? fake : nullptr;
  args.element_bytes = element_bytes;
  return check_linear_args(args);
}

std::string check_conv(std::vector<int64_t> input, std::vector<int64_t> kernel, std::vector<int64_t> output,
                       std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  ConvArgs args;
  args.batch = 1;
  args.in_channels = args.out_channels = args.active_in = args.active_out = 1;
  for (int d = 0; d < kSpatialDims; ++d) {
    args.input[d] = int32_t(input[d]);
    args.kernel[d] = int32_t(kernel[d]);
    args.output[d] = int32_t(output[d]);
    args.stride[d] = int32_t(stride[d]);
    args.padding[d] = int32_t(padding[d]);
    args.dilation[d] = int32_t(dilation[d]);
  }
  return check_conv_args(args);
}

// axis_point of a map with an inner box, for the index-map tests.
std::vector<int64_t> axis_point_of(int64_t count, std::vector<int64_t> inner, int64_t outer_stride,
                                   std::vector<int64_t> inner_stride, std::vector<int64_t> scale,
                                   std::vector<int64_t> shift, const OptionalTensor& index, int64_t i) {
  AxisMap axis;
  axis.index = index_or_null(index);
  axis.index_count = index ? index->numel() : count;
  axis.full_count = count;
  axis.outer_stride = outer_stride;
  for (int d = 0; d < kSpatialDims; ++d) {
    axis.inner[d] = int32_t(inner[d]);
    axis.inner_stride[d] = inner_stride[d];
    axis.coordinate_scale[d] = int32_t(scale[d]);
    axis.coordinate_shift[d] = int32_t(shift[d]);
  }
  axis.count = axis.index_count * inner_points(axis);
  const AxisPoint p = axis_point(axis, i);
  return {p.offset, p.coordinate[0], p.coordinate[1], p.coordinate[2]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear);
  m.def("conv", &conv);
  m.def("linear_forward_plan", &linear_forward_plan);
  m.def("check_linear", &check_linear);
  m.def("check_conv", &check_conv);
  m.def("axis_point", &axis_point_of);
}
