r"""The CUDA kernels of the ``gpu`` engine, each beside the formula it computes.

One source, compiled once per element type ``real`` (``-DSCRATCHVAE_REAL=float``
or ``=double``). Every kernel is one fused elementwise stretch of the
reference step (:meth:`scratchvae.model.VAE.loss_and_grad`, whose step names
F1-F8 and B1-B8 the comments use), one thread per element, so a step is
eleven matrix products, a few sums and these launches. ``tests/test_gpu.py``
compiles the source with NVRTC for ``sm_90`` (no GPU needed) and, where a
GPU is present, checks the engine against the reference step.

Activation codes (:data:`ACTIVATION_CODES`): 0 identity, 1 relu, 2 tanh,
3 sigmoid, 4 softplus. Every derivative is written in terms of the output
``y``: relu :math:`[y > 0]`, tanh :math:`1 - y^2`, sigmoid :math:`y(1 - y)`,
softplus :math:`\sigma(a) = 1 - e^{-y}`.
"""

from __future__ import annotations

ACTIVATION_CODES = {"identity": 0, "relu": 1, "tanh": 2, "sigmoid": 3, "softplus": 4}

SOURCE = r"""
#ifndef SCRATCHVAE_REAL
#define SCRATCHVAE_REAL float
#endif
typedef SCRATCHVAE_REAL real;

__device__ real activation(real a, int code) {
    if (code == 1) return a > (real)0 ? a : (real)0;                         // relu
    if (code == 2) return tanh(a);                                     // tanh
    if (code == 3) return (real)0.5 * (tanh((real)0.5 * a) + (real)1);          // sigmoid, via tanh
    if (code == 4) return fmax(a, (real)0) + log1p(exp(-fabs(a)));        // softplus
    return a;                                                          // identity
}

__device__ real activation_slope(real y, int code) {
    if (code == 1) return y > (real)0 ? (real)1 : (real)0;
    if (code == 2) return (real)1 - y * y;
    if (code == 3) return y * ((real)1 - y);
    if (code == 4) return -expm1(-y);                                  // sigma(a) = 1 - e^{-y}
    return (real)1;
}

// y = act(y + b): the bias and activation after the product y = x W of a dense layer.
extern "C" __global__ void bias_activation(real* y, const real* b, int rows, int cols, int code) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < rows * cols) y[i] = activation(y[i] + b[i % cols], code);
}

// d_a = d_y * act'(a), from the activation's output y, in place.
extern "C" __global__ void activation_backward(real* d, const real* y, int n, int code) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] *= activation_slope(y[i], code);
}

// F2, F3, F6: log_var = c tanh(h / c) (c = 0: h), sigma = exp(log_var / 2), z = mu + sigma eps,
// and the KL terms -1/2 (1 + log_var - mu^2 - sigma^2) of the J latent units, for enc_out = [mu, h] (B, 2J).
extern "C" __global__ void reparameterize_kl(const real* enc_out, const real* eps, real* z, real* log_var, real* sigma,
                                             real* kl_terms, int rows, int J, real c) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * J) return;
    int r = i / J, j = i % J;
    real mu = enc_out[r * 2 * J + j], h = enc_out[r * 2 * J + J + j];
    real lv = c > (real)0 ? c * tanh(h / c) : h;
    real s = exp((real)0.5 * lv);
    log_var[i] = lv;
    sigma[i] = s;
    z[i] = mu + s * eps[i];
    kl_terms[i] = (real)-0.5 * ((real)1 + lv - mu * mu - s * s);
}

// F5 and B5, Bernoulli: nll = softplus(l) - x l = max(l, 0) - x l + log1p(exp(-|l|)),
// d_l = scale (sigmoid(l) - x), with scale = 1/B.
extern "C" __global__ void bernoulli_nll(const real* logits, const real* x, real* nll_terms, real* d_logits, int n, real scale) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    real l = logits[i];
    nll_terms[i] = fmax(l, (real)0) - x[i] * l + log1p(exp(-fabs(l)));
    d_logits[i] = scale * ((real)0.5 * (tanh((real)0.5 * l) + (real)1) - x[i]);
}

// F5 and B5, Gaussian with a fixed log-variance lv: nll = 1/2 (log 2 pi + lv + (x - m)^2 e^{-lv}),
// d_m = scale (m - x) e^{-lv}.
extern "C" __global__ void gaussian_nll(const real* mean, const real* x, real* nll_terms, real* d_mean, int n, real lv, real scale) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    real diff = mean[i] - x[i], inv_var = exp(-lv);
    nll_terms[i] = (real)0.5 * ((real)1.8378770664093453 + lv + diff * diff * inv_var);
    d_mean[i] = scale * diff * inv_var;
}

// F5 and B5, Gaussian with a learned log-variance, for dec_out = [m, h] (B, 2D): lv = c tanh(h / c) (c = 0: h),
// nll = 1/2 (log 2 pi + lv + (x - m)^2 e^{-lv}), d_m = scale (m - x) e^{-lv},
// d_h = scale 1/2 (1 - (x - m)^2 e^{-lv}) (1 - (lv / c)^2) (c = 0: without the last factor), as d_dec_out (B, 2D).
extern "C" __global__ void gaussian_learned_nll(const real* dec_out, const real* x, real* nll_terms, real* d_dec_out, int rows,
                                                int D, real c, real scale) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * D) return;
    int m_at = (i / D) * 2 * D + i % D, h_at = m_at + D;
    real h = dec_out[h_at], lv = c > (real)0 ? c * tanh(h / c) : h;
    real diff = dec_out[m_at] - x[i], inv_var = exp(-lv);
    nll_terms[i] = (real)0.5 * ((real)1.8378770664093453 + lv + diff * diff * inv_var);
    d_dec_out[m_at] = scale * diff * inv_var;
    real d_lv = scale * (real)0.5 * ((real)1 - diff * diff * inv_var);
    d_dec_out[h_at] = c > (real)0 ? d_lv * ((real)1 - (lv / c) * (lv / c)) : d_lv;
}

// F7, F8: recon = sum(nll terms) / B, kl = sum(KL terms) / B, loss = recon + beta kl, as parts = [loss, recon, kl].
extern "C" __global__ void batch_means(const real* nll_sum, const real* kl_sum, real* parts, real B, real beta) {
    if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
    real recon = nll_sum[0] / B, kl = kl_sum[0] / B;
    parts[0] = recon + beta * kl;
    parts[1] = recon;
    parts[2] = kl;
}

// B6, B3, B2: d_mu = d_z + (beta/B) mu; d_log_var = d_z eps sigma / 2 + (beta/B) (sigma^2 - 1) / 2;
// d_h = d_log_var (1 - (log_var / c)^2) (c = 0: d_log_var), written as d_enc_out = [d_mu, d_h] (B, 2J).
extern "C" __global__ void reparameterize_kl_backward(const real* d_z, const real* enc_out, const real* eps, const real* log_var,
                                                      const real* sigma, real* d_enc_out, int rows, int J, real beta_b, real c) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * J) return;
    int r = i / J, j = i % J;
    real mu = enc_out[r * 2 * J + j], s = sigma[i], lv = log_var[i];
    real d_lv = d_z[i] * eps[i] * s * (real)0.5 + beta_b * (real)0.5 * (s * s - (real)1);
    d_enc_out[r * 2 * J + j] = d_z[i] + beta_b * mu;
    d_enc_out[r * 2 * J + J + j] = c > (real)0 ? d_lv * ((real)1 - (lv / c) * (lv / c)) : d_lv;
}

// Adam over the flat buffer: g = grad + wd p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr (m / bc1) / (sqrt(v / bc2) + eps), with bc1 = 1 - b1^t, bc2 = 1 - b2^t.
extern "C" __global__ void adam_update(real* p, const real* grad, real* m, real* v, long long n, real lr, real b1, real b2, real eps,
                                       real wd, real bc1, real bc2) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    real g = grad[i] + wd * p[i];
    real mi = b1 * m[i] + ((real)1 - b1) * g;
    real vi = b2 * v[i] + ((real)1 - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    p[i] -= lr * (mi / bc1) / (sqrt(vi / bc2) + eps);
}

// SGD with momentum over the flat buffer: velocity = momentum velocity + grad + wd p; p -= lr velocity.
extern "C" __global__ void sgd_update(real* p, const real* grad, real* velocity, long long n, real lr, real momentum, real wd) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    real vel = momentum * velocity[i] + grad[i] + wd * p[i];
    velocity[i] = vel;
    p[i] -= lr * vel;
}

// Philox4x32-10 (Salmon et al., 2011): four 32-bit words from a 128-bit counter and a 64-bit key.
__device__ void philox4x32_10(unsigned int ctr[4], unsigned int key0, unsigned int key1) {
    for (int round = 0; round < 10; ++round) {
        unsigned int hi0 = __umulhi(0xD2511F53u, ctr[0]), lo0 = 0xD2511F53u * ctr[0];
        unsigned int hi1 = __umulhi(0xCD9E8D57u, ctr[2]), lo1 = 0xCD9E8D57u * ctr[2];
        unsigned int next[4] = {hi1 ^ ctr[1] ^ key0, lo1, hi0 ^ ctr[3] ^ key1, lo0};
        ctr[0] = next[0]; ctr[1] = next[1]; ctr[2] = next[2]; ctr[3] = next[3];
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
}

// eps ~ N(0, 1) for step t: the block of four words at counter (i / 4, t, stream, 0) under key (seed_lo, seed_hi),
// two Box-Muller pairs u = (w + 1/2) / 2^32 in (0, 1). Element i is a function of (seed, stream, t, i) alone,
// so a resumed run draws exactly the noise an uninterrupted one draws.
extern "C" __global__ void philox_normal(real* out, long long n, unsigned int seed_lo, unsigned int seed_hi,
                                         unsigned int t, unsigned int stream) {
    long long block = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (block * 4 >= n) return;
    unsigned int w[4] = {(unsigned int)block, t, stream, 0u};
    philox4x32_10(w, seed_lo, seed_hi);
    for (int pair = 0; pair < 2; ++pair) {
        double u1 = ((double)w[2 * pair] + 0.5) * 2.3283064365386963e-10;
        double u2 = ((double)w[2 * pair + 1] + 0.5) * 2.3283064365386963e-10;
        double radius = sqrt(-2.0 * log(u1)), angle = 6.283185307179586 * u2;
        long long i = block * 4 + 2 * pair;
        if (i < n) out[i] = (real)(radius * cos(angle));
        if (i + 1 < n) out[i + 1] = (real)(radius * sin(angle));
    }
}
"""

KERNELS = (
    "bias_activation", "activation_backward", "reparameterize_kl", "bernoulli_nll", "gaussian_nll",
    "gaussian_learned_nll", "batch_means", "reparameterize_kl_backward", "adam_update", "sgd_update", "philox_normal",
)  # fmt: skip

ELEMENT_TYPES = {"float32": "float", "float64": "double"}
