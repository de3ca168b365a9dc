// Host-side harness for tests/test_ops.py: runs the CUDA plugins' shared math (torch_utils/ops/*.h) on CPU
// tensors, with the plugins' Python signatures, so the kernels' index and activation math is checked without a GPU.
#include <torch/extension.h>
#include <type_traits>
#include "upfirdn2d.h"
#include "bias_act.h"

at::Tensor upfirdn2d(at::Tensor x, at::Tensor f, int up_x, int up_y, int down_x, int down_y,
                     int pad_x0, int pad_x1, int pad_y0, int pad_y1)
{
    Upfirdn2dParams p;
    p.in_c = x.size(1); p.in_h = x.size(2); p.in_w = x.size(3);
    p.sn = x.stride(0); p.sc = x.stride(1); p.sh = x.stride(2); p.sw = x.stride(3);
    p.up_x = up_x; p.up_y = up_y; p.down_x = down_x; p.down_y = down_y;
    p.pad_x0 = pad_x0; p.pad_y0 = pad_y0;
    p.f_h = f.size(0); p.f_w = f.size(1);
    p.out_h = (p.in_h * up_y + pad_y0 + pad_y1 - p.f_h) / down_y + 1;
    p.out_w = (p.in_w * up_x + pad_x0 + pad_x1 - p.f_w) / down_x + 1;
    at::Tensor y = at::empty({x.size(0), p.in_c, p.out_h, p.out_w}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::Half, x.scalar_type(), "h", [&] {
        using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        TORCH_CHECK(f.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "filter dtype");
        scalar_t* yp = y.data_ptr<scalar_t>();
        for (int64_t idx = 0; idx < y.numel(); ++idx) {
            int64_t ox = idx % p.out_w, r = idx / p.out_w, oy = r % p.out_h; r /= p.out_h;
            int64_t c = r % p.in_c, n = r / p.in_c;
            yp[idx] = (scalar_t)upfirdn2d_output<scalar_t, acc_t>(x.data_ptr<scalar_t>(), f.data_ptr<acc_t>(), p, n, c, oy, ox);
        }
    });
    return y;
}

at::Tensor bias_act(at::Tensor x, at::Tensor b, at::Tensor g, at::Tensor h, int act, double alpha, double gain,
                    double clamp, int mode, int dim)
{
    BiasActParams p; p.act = act; p.mode = mode; p.alpha = alpha; p.gain = gain; p.clamp = clamp;
    p.total = x.numel(); p.dim_size = x.size(dim); p.dim_inner = 1;
    for (int d = dim + 1; d < x.dim(); ++d) p.dim_inner *= x.size(d);
    TORCH_CHECK(x.is_contiguous(), "x contiguous");
    at::Tensor out = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::Half, x.scalar_type(), "b", [&] {
        using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
        const scalar_t* bp = b.numel() ? b.data_ptr<scalar_t>() : nullptr;
        const scalar_t* gp = g.numel() ? g.data_ptr<scalar_t>() : nullptr;
        const scalar_t* hp = h.numel() ? h.data_ptr<scalar_t>() : nullptr;
        for (int64_t i = 0; i < p.total; ++i) {
            acc_t z = (acc_t)x.data_ptr<scalar_t>()[i];
            if (bp) z += (acc_t)bp[(i / p.dim_inner) % p.dim_size];
            out.data_ptr<scalar_t>()[i] = (scalar_t)bias_act_element<acc_t>(p, z, gp ? (acc_t)gp[i] : 0, hp ? (acc_t)hp[i] : 0);
        }
    });
    return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("upfirdn2d", &upfirdn2d); m.def("bias_act", &bias_act); }
