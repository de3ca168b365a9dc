// upfirdn2d plugin: Python binding and argument checks (the kernel is in upfirdn2d.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include "upfirdn2d.h"

at::Tensor upfirdn2d_cuda(
    const at::Tensor& x, const at::Tensor& f,
    int up_x, int up_y, int down_x, int down_y,
    int pad_x0, int pad_x1, int pad_y0, int pad_y1);

static at::Tensor upfirdn2d(
    at::Tensor x,                   // [N, C, H, W], float16/bfloat16/float32/float64, on CUDA.
    at::Tensor f,                   // [f_h, f_w] true-convolution kernel, float32 (float64 for float64 x).
    int up_x, int up_y, int down_x, int down_y,
    int pad_x0, int pad_x1, int pad_y0, int pad_y1)
{
    TORCH_CHECK(x.is_cuda(), "upfirdn2d.cpp: x must be a CUDA tensor");
    TORCH_CHECK(f.device() == x.device(), "upfirdn2d.cpp: f must be on the device of x");
    TORCH_CHECK(x.dim() == 4, "upfirdn2d.cpp: x must be [N, C, H, W]");
    TORCH_CHECK(f.dim() == 2 && f.is_contiguous(), "upfirdn2d.cpp: f must be a contiguous [f_h, f_w] tensor");
    TORCH_CHECK(f.numel() > 0 && f.size(0) <= INT_MAX && f.size(1) <= INT_MAX, "upfirdn2d.cpp: bad filter size");
    TORCH_CHECK(up_x >= 1 && up_y >= 1 && down_x >= 1 && down_y >= 1, "upfirdn2d.cpp: up/down must be >= 1");
    const c10::cuda::CUDAGuard device_guard(x.device());
    return upfirdn2d_cuda(x, f, up_x, up_y, down_x, down_y, pad_x0, pad_x1, pad_y0, pad_y1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("upfirdn2d", &upfirdn2d, "upfirdn2d (CUDA)");
}
