// bias_act plugin: Python binding and argument checks (the kernel is in bias_act.cu).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include "bias_act.h"

at::Tensor bias_act_cuda(
    const at::Tensor& x, const at::Tensor& b, const at::Tensor& g, const at::Tensor& h,
    int act, double alpha, double gain, double clamp, int mode, int dim);

static void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name)
{
    if (t.numel() == 0)
        return; // Absent.
    TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(),
                "bias_act.cpp: ", name, " must have the device and dtype of x");
    TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous(), "bias_act.cpp: ", name, " must be contiguous and shaped like x");
}

static at::Tensor bias_act(
    at::Tensor x,       // Input, contiguous, on CUDA.
    at::Tensor b,       // Bias [x.size(dim)], or empty for none.
    at::Tensor g,       // Incoming gradient (modes 1, 2), or empty.
    at::Tensor h,       // Second incoming gradient (mode 2), or empty.
    int act, double alpha, double gain, double clamp, int mode, int dim)
{
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "bias_act.cpp: x must be a contiguous CUDA tensor");
    TORCH_CHECK(x.dim() == 0 || (dim >= 0 && dim < x.dim()), "bias_act.cpp: dim out of range");
    TORCH_CHECK(act >= BIAS_ACT_LINEAR && act <= BIAS_ACT_SWISH, "bias_act.cpp: unknown activation index");
    TORCH_CHECK(mode >= 0 && mode <= 2, "bias_act.cpp: mode must be 0, 1 or 2");
    if (b.numel())
    {
        TORCH_CHECK(b.device() == x.device() && b.scalar_type() == x.scalar_type(), "bias_act.cpp: b must have the device and dtype of x");
        TORCH_CHECK(b.dim() == 1 && b.is_contiguous() && b.size(0) == x.size(dim), "bias_act.cpp: b must be [x.size(dim)]");
    }
    check_like_x(g, x, "g");
    check_like_x(h, x, "h");
    TORCH_CHECK(mode == 0 || g.numel() == x.numel(), "bias_act.cpp: modes 1 and 2 need g");
    TORCH_CHECK(mode != 2 || h.numel() == x.numel(), "bias_act.cpp: mode 2 needs h");
    const c10::cuda::CUDAGuard device_guard(x.device());
    return bias_act_cuda(x, b, g, h, act, alpha, gain, clamp, mode, dim);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("bias_act", &bias_act, "bias_act (CUDA)");
}
