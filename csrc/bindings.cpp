// pybind11 module loraprune._C: raw device pointers (ints), sizes, strides, dtype codes and the
// CUDA stream handle in, nothing returned; loraprune/ops/cuda.py prepares the tensors. No
// PyTorch or CUDA headers here, so the module builds against any torch. Launches release the
// GIL; std::invalid_argument becomes ValueError and std::runtime_error (CUDA errors) RuntimeError.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "loraprune_C.h"

namespace py = pybind11;

namespace {

using Ptr = std::uintptr_t;

loraprune::QuantizedWeightArgs quantized(int format, Ptr scales, Ptr code, std::int64_t blocksize) {
  return {static_cast<loraprune::WeightFormat>(format), scales, code, blocksize};
}

void lora_importance(int device, Ptr stream, Ptr weight, int dtype, std::int64_t out_features,
                     std::int64_t in_features, std::int64_t weight_row_stride, Ptr lora_a, Ptr lora_b, Ptr grad_a,
                     Ptr grad_b, std::int64_t rank, double scaling, bool squared, Ptr row_sums, Ptr col_sums,
                     Ptr workspace, std::int64_t workspace_floats, int weight_format, Ptr weight_scales,
                     Ptr weight_code, std::int64_t weight_blocksize, bool double_buffer) {
  loraprune::lora_importance({device, stream}, weight, static_cast<loraprune::DType>(dtype), out_features,
                             in_features, weight_row_stride, lora_a, lora_b, grad_a, grad_b, rank, scaling, squared,
                             row_sums, col_sums, workspace, workspace_floats,
                             quantized(weight_format, weight_scales, weight_code, weight_blocksize), double_buffer);
}

void taylor_importance(int device, Ptr stream, Ptr x, Ptr grad_y, int dtype, std::int64_t tokens,
                       std::int64_t out_features, std::int64_t in_features, std::int64_t x_row_stride,
                       std::int64_t grad_row_stride, Ptr weight, int weight_dtype, std::int64_t weight_row_stride,
                       Ptr lora_a, Ptr lora_b, std::int64_t rank, double scaling, bool squared, Ptr row_sums,
                       Ptr col_sums, Ptr workspace, std::int64_t workspace_floats, int weight_format,
                       Ptr weight_scales, Ptr weight_code, std::int64_t weight_blocksize) {
  loraprune::taylor_importance({device, stream}, x, grad_y, static_cast<loraprune::DType>(dtype), tokens,
                               out_features, in_features, x_row_stride, grad_row_stride, weight,
                               static_cast<loraprune::DType>(weight_dtype), weight_row_stride, lora_a, lora_b, rank,
                               scaling, squared, row_sums, col_sums, workspace, workspace_floats,
                               quantized(weight_format, weight_scales, weight_code, weight_blocksize));
}

void score_update(int device, Ptr stream, Ptr scores, std::int64_t num_units, const std::vector<Ptr>& parts,
                  const std::vector<std::int64_t>& part_lengths, const std::vector<std::int64_t>& part_strides,
                  const std::vector<int>& part_dtypes, double decay, Ptr num_updates, Ptr num_skipped) {
  loraprune::score_update({device, stream}, scores, num_units, parts, part_lengths, part_strides, part_dtypes, decay,
                          num_updates, num_skipped);
}

void compact_linear(int device, Ptr stream, Ptr weight, int dtype, std::int64_t out_features,
                    std::int64_t in_features, std::int64_t weight_row_stride, Ptr lora_a, Ptr lora_b,
                    std::int64_t rank, double scaling, Ptr rows, std::int64_t num_rows, Ptr cols,
                    std::int64_t num_cols, Ptr out) {
  loraprune::compact_linear({device, stream}, weight, static_cast<loraprune::DType>(dtype), out_features,
                            in_features, weight_row_stride, lora_a, lora_b, rank, scaling, rows, num_rows, cols,
                            num_cols, out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "loraprune CUDA kernels (raw-pointer interface; use loraprune.ops, see loraprune/ops/cuda.py)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(loraprune::DType::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(loraprune::DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(loraprune::DType::kBFloat16);
  m.attr("WEIGHT_DENSE") = static_cast<int>(loraprune::WeightFormat::kDense);
  m.attr("WEIGHT_INT8") = static_cast<int>(loraprune::WeightFormat::kInt8);
  m.attr("WEIGHT_FOUR_BIT") = static_cast<int>(loraprune::WeightFormat::kFourBit);
  m.attr("CUDA_RUNTIME_VERSION") = loraprune::cuda_runtime_version();
  m.attr("CUDA_ARCHITECTURES") = loraprune::cuda_architectures();

  m.def("lora_importance_workspace_floats", &loraprune::lora_importance_workspace_floats,
        "Floats of float32 workspace lora_importance needs.", py::arg("out_features"), py::arg("in_features"));
  m.def("lora_importance", &lora_importance,
        "Row sums (out,) and column sums (in,) of |G ⊙ (W + s·B·A)| into row_sums/col_sums (float32); "
        "W dense (weight_format 0) or quantized (1: int8 with row scales, 2: packed 4-bit with block scales and "
        "code); double_buffer: cp.async double-buffered factor staging.",
        py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("stream"), py::arg("weight"),
        py::arg("dtype"), py::arg("out_features"), py::arg("in_features"), py::arg("weight_row_stride"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("grad_a"), py::arg("grad_b"), py::arg("rank"),
        py::arg("scaling"), py::arg("squared"), py::arg("row_sums"), py::arg("col_sums"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("weight_format") = 0, py::arg("weight_scales") = 0,
        py::arg("weight_code") = 0, py::arg("weight_blocksize") = 0, py::arg("double_buffer") = true);
  m.def("taylor_importance_workspace_floats", &loraprune::taylor_importance_workspace_floats,
        "Floats of float32 workspace taylor_importance needs.", py::arg("out_features"), py::arg("in_features"));
  m.def("taylor_importance", &taylor_importance,
        "Row sums (out,) and column sums (in,) of |(dYᵀX) ⊙ (W + s·B·A)| into row_sums/col_sums (float32).",
        py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("stream"), py::arg("x"),
        py::arg("grad_y"), py::arg("dtype"), py::arg("tokens"), py::arg("out_features"), py::arg("in_features"),
        py::arg("x_row_stride"), py::arg("grad_row_stride"), py::arg("weight"), py::arg("weight_dtype"),
        py::arg("weight_row_stride"), py::arg("lora_a"), py::arg("lora_b"), py::arg("rank"), py::arg("scaling"),
        py::arg("squared"), py::arg("row_sums"), py::arg("col_sums"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("weight_format") = 0, py::arg("weight_scales") = 0,
        py::arg("weight_code") = 0, py::arg("weight_blocksize") = 0);
  m.def("score_update", &score_update, "Fold, normalise and average one step's parts into scores, in place.",
        py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("stream"), py::arg("scores"),
        py::arg("num_units"), py::arg("parts"), py::arg("part_lengths"), py::arg("part_strides"),
        py::arg("part_dtypes"), py::arg("decay"), py::arg("num_updates"), py::arg("num_skipped"));
  m.def("compact_linear", &compact_linear, "out = (W + s·B·A)[rows][:, cols] in W's dtype.",
        py::call_guard<py::gil_scoped_release>(), py::arg("device"), py::arg("stream"), py::arg("weight"),
        py::arg("dtype"), py::arg("out_features"), py::arg("in_features"), py::arg("weight_row_stride"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("rank"), py::arg("scaling"), py::arg("rows"),
        py::arg("num_rows"), py::arg("cols"), py::arg("num_cols"), py::arg("out"));
}
