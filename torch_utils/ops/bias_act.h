// bias_act plugin: the per-element math, shared by the CUDA kernel and host-side checks.
//
// For z = x + b (b broadcast along one dim) the op is  y = clamp(act(z) * gain, -clamp, clamp)  (clamp < 0 =
// no clamping). Gradients are taken through the same formula:
//     mode 0: out = y
//     mode 1: out = g * act'(z) * gain * m              (first derivative; g = incoming gradient)
//     mode 2: out = g * h * act''(z) * gain * m         (second derivative; h = gradient of mode 1's input)
// with m = 1 where the clamp is inactive (|act(z) * gain| <= clamp, as torch.clamp's gradient) else 0.
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define MRI_GAN_HD __host__ __device__ __forceinline__
#else
#define MRI_GAN_HD inline
#endif

// Activation indices: must match `cuda_idx` in bias_act.py.
enum BiasActKind
{
    BIAS_ACT_LINEAR = 1,
    BIAS_ACT_RELU = 2,
    BIAS_ACT_LRELU = 3,
    BIAS_ACT_TANH = 4,
    BIAS_ACT_SIGMOID = 5,
    BIAS_ACT_ELU = 6,
    BIAS_ACT_SELU = 7,
    BIAS_ACT_SOFTPLUS = 8,
    BIAS_ACT_SWISH = 9,
};

struct BiasActParams
{
    int act;                // BiasActKind.
    int mode;               // 0 = value, 1 = first derivative, 2 = second derivative.
    double alpha;           // lrelu slope / elu scale.
    double gain;            // Applied after the activation.
    double clamp;           // < 0 = no clamping.
    int64_t total;          // Number of elements of x.
    int64_t dim_size;       // Size of the bias dim (b has this many entries) ...
    int64_t dim_inner;      // ... and the product of the sizes after it (x contiguous).
};

// Value, first and second derivative of the activation at z.
template <typename T>
MRI_GAN_HD void bias_act_eval(int act, T z, T alpha, T& v, T& d1, T& d2)
{
    const T one = 1, zero = 0;
    switch (act)
    {
    case BIAS_ACT_RELU:
        v = z > zero ? z : zero; d1 = z > zero ? one : zero; d2 = zero; break;
    case BIAS_ACT_LRELU:
        v = z > zero ? z : alpha * z; d1 = z > zero ? one : alpha; d2 = zero; break;
    case BIAS_ACT_TANH:
    {
        const T t = tanh(z);
        v = t; d1 = one - t * t; d2 = -2 * t * (one - t * t); break;
    }
    case BIAS_ACT_SIGMOID:
    {
        const T s = one / (one + exp(-z));
        v = s; d1 = s * (one - s); d2 = s * (one - s) * (one - 2 * s); break;
    }
    case BIAS_ACT_ELU:
    {
        const T e = exp(z < zero ? z : zero); // exp only of the negative branch: no overflow.
        v = z > zero ? z : alpha * (e - one); d1 = z > zero ? one : alpha * e; d2 = z > zero ? zero : alpha * e; break;
    }
    case BIAS_ACT_SELU:
    {
        const T scale = (T)1.0507009873554804934193349852946, a = (T)1.6732632423543772848170429916717;
        const T e = exp(z < zero ? z : zero);
        v = z > zero ? scale * z : scale * a * (e - one);
        d1 = z > zero ? scale : scale * a * e;
        d2 = z > zero ? zero : scale * a * e;
        break;
    }
    case BIAS_ACT_SOFTPLUS:
    {
        // torch.nn.functional.softplus(beta=1, threshold=20): linear above the threshold.
        const T s = one / (one + exp(-z));
        const bool lin = z > (T)20;
        v = lin ? z : log1p(exp(z)); d1 = lin ? one : s; d2 = lin ? zero : s * (one - s); break;
    }
    case BIAS_ACT_SWISH:
    {
        const T s = one / (one + exp(-z));
        v = z * s; d1 = s * (one + z * (one - s)); d2 = s * (one - s) * (2 + z * (one - 2 * s)); break;
    }
    default: // BIAS_ACT_LINEAR
        v = z; d1 = one; d2 = zero; break;
    }
}

template <typename T>
MRI_GAN_HD T bias_act_element(const BiasActParams& p, T z, T g, T h)
{
    T v, d1, d2;
    bias_act_eval<T>(p.act, z, (T)p.alpha, v, d1, d2);
    const T gain = (T)p.gain, clamp = (T)p.clamp;
    const T y = v * gain;
    if (p.mode == 0)
    {
        if (p.clamp >= 0)
            return y > clamp ? clamp : (y < -clamp ? -clamp : y);
        return y;
    }
    if (p.clamp >= 0 && (y > clamp || y < -clamp))
        return (T)0;
    return p.mode == 1 ? g * d1 * gain : g * h * d2 * gain;
}
