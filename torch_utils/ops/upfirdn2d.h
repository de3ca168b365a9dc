// upfirdn2d plugin: the per-output-sample math, shared by the CUDA kernel and host-side checks.
//
// Op (StyleGAN2, Karras et al. 2020): upsample by zero insertion, pad, convolve with the FIR filter f,
// keep every down-th sample. Per axis, with K taps, output o reads the zero-inserted, padded signal at
// positions o*down + j (j = 0..K-1) against tap K-1-j, and padded position m holds x[i] iff m - pad0 = up*i:
//     y[o] = sum_i x[i] * f[t - up*i],   t = o*down + K - 1 - pad0,   over i with 0 <= t - up*i <= K-1.
// So each output visits only the ~K/up input samples that can reach it (no multiplications by zeros).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MRI_GAN_HD __host__ __device__ __forceinline__
#else
#define MRI_GAN_HD inline
#endif

struct Upfirdn2dParams
{
    int64_t in_c, in_h, in_w;       // Input sizes (batch is implied by the output index).
    int64_t sn, sc, sh, sw;         // Input strides, in elements (any layout works).
    int64_t out_h, out_w;           // Output sizes; output is contiguous [N, C, out_h, out_w].
    int up_x, up_y, down_x, down_y;
    int pad_x0, pad_y0;             // Front padding; back padding only sets out_w / out_h.
    int f_w, f_h;                   // Filter taps; f is contiguous [f_h, f_w], a true-convolution kernel.
};

MRI_GAN_HD int64_t upfirdn2d_floor_div(int64_t a, int64_t b) // b > 0; C++ '/' truncates toward zero.
{
    const int64_t q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

template <typename scalar_t, typename acc_t>
MRI_GAN_HD acc_t upfirdn2d_output(
    const scalar_t* x,              // Input base pointer.
    const acc_t* f,                 // Filter [f_h, f_w], gain included.
    const Upfirdn2dParams& p,
    int64_t n, int64_t c, int64_t oy, int64_t ox)
{
    const int64_t ty = oy * p.down_y + p.f_h - 1 - p.pad_y0;
    const int64_t tx = ox * p.down_x + p.f_w - 1 - p.pad_x0;
    // Valid i: t - K < up*i <= t, i.e. floor((t - K) / up) + 1 <= i <= floor(t / up), within the input.
    int64_t iy0 = upfirdn2d_floor_div(ty - p.f_h, p.up_y) + 1;
    int64_t iy1 = upfirdn2d_floor_div(ty, p.up_y);
    int64_t ix0 = upfirdn2d_floor_div(tx - p.f_w, p.up_x) + 1;
    int64_t ix1 = upfirdn2d_floor_div(tx, p.up_x);
    if (iy0 < 0) iy0 = 0;
    if (ix0 < 0) ix0 = 0;
    if (iy1 > p.in_h - 1) iy1 = p.in_h - 1;
    if (ix1 > p.in_w - 1) ix1 = p.in_w - 1;

    const scalar_t* xp = x + n * p.sn + c * p.sc;
    acc_t acc = 0;
    for (int64_t iy = iy0; iy <= iy1; ++iy)
    {
        const acc_t* frow = f + (ty - p.up_y * iy) * p.f_w;
        const scalar_t* xrow = xp + iy * p.sh;
        for (int64_t ix = ix0; ix <= ix1; ++ix)
            acc += static_cast<acc_t>(xrow[ix * p.sw]) * frow[tx - p.up_x * ix];
    }
    return acc;
}
