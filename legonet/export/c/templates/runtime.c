/*@kernel common*/
/* A weight matrix (rows = output channels, cols = the rest flattened), either dense or as
 * b_r x b_c blocks: a ceil(log2 K)-bit codebook index per block, bit-packed little-endian. */
typedef struct {
    const float *dense;     /* rows x cols, or NULL when clustered */
    const float *codebook;  /* K x (br*bc) */
    const uint8_t *packed;  /* index of block n at bits [n*width, (n+1)*width) */
    const float *scale;     /* optional per-row gain (rows), or NULL */
    uint32_t rows, cols, br, bc, grid_cols, width;
} lg_weight;

static uint32_t lg_index(const uint8_t *packed, uint32_t bit, uint32_t width)
{
    uint32_t byte = bit >> 3, shift = bit & 7u, nbytes = (shift + width + 7u) >> 3, i;
    uint64_t v = 0;
    for (i = 0; i < nbytes; i++) v |= (uint64_t)packed[byte + i] << (8u * i);
    return (uint32_t)((v >> shift) & ((1ull << width) - 1ull));
}

/* Rows [r0, r0+br) of the weight: decoded into scratch (row stride grid_cols*bc) or read in place.
 * The scratch holds one block-row: br * grid_cols * bc floats. */
static const float *lg_rows(const lg_weight *w, uint32_t r0, float *scratch, uint32_t *stride)
{
    uint32_t j, a, b, row = r0 / w->br;
    if (w->dense) { *stride = w->cols; return w->dense + (size_t)r0 * w->cols; }
    *stride = w->grid_cols * w->bc;
    for (j = 0; j < w->grid_cols; j++) {
        uint32_t k = lg_index(w->packed, (row * w->grid_cols + j) * w->width, w->width);
        const float *c = w->codebook + (size_t)k * w->br * w->bc;
        for (a = 0; a < w->br; a++) {
            float g = (w->scale && r0 + a < w->rows) ? w->scale[r0 + a] : 1.0f;
            for (b = 0; b < w->bc; b++) scratch[a * *stride + j * w->bc + b] = c[a * w->bc + b] * g;
        }
    }
    return scratch;
}
/*@end*/

/*@kernel conv*/
static void lg_conv2d(const float *in, uint32_t C, uint32_t H, uint32_t W, float *out, uint32_t OH, uint32_t OW,
                      const lg_weight *w, const float *bias, uint32_t kh, uint32_t kw, uint32_t sh, uint32_t sw,
                      uint32_t ph, uint32_t pw, uint32_t groups, float *scratch)
{
    uint32_t O = w->rows, cpg = C / groups, opg = O / groups, r0, o, oy, ox, c, ky, kx, stride;
    for (r0 = 0; r0 < O; r0 += w->br) {
        const float *rows = lg_rows(w, r0, scratch, &stride);
        for (o = r0; o < O && o < r0 + w->br; o++) {
            const float *wo = rows + (size_t)(o - r0) * stride;
            const float *ing = in + (size_t)(o / opg) * cpg * H * W;
            for (oy = 0; oy < OH; oy++) {
                for (ox = 0; ox < OW; ox++) {
                    float acc = bias ? bias[o] : 0.0f;
                    for (c = 0; c < cpg; c++) {
                        for (ky = 0; ky < kh; ky++) {
                            int32_t iy = (int32_t)(oy * sh + ky) - (int32_t)ph;
                            if (iy < 0 || iy >= (int32_t)H) continue;
                            for (kx = 0; kx < kw; kx++) {
                                int32_t ix = (int32_t)(ox * sw + kx) - (int32_t)pw;
                                if (ix < 0 || ix >= (int32_t)W) continue;
                                acc += ing[((size_t)c * H + (uint32_t)iy) * W + (uint32_t)ix] * wo[(c * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((size_t)o * OH + oy) * OW + ox] = acc;
                }
            }
        }
    }
}
/*@end*/

/*@kernel bn*/
static void lg_batchnorm(float *x, uint32_t C, uint32_t HW, const float *weight, const float *bias,
                         const float *mean, const float *var, float eps)
{
    uint32_t c, i;
    for (c = 0; c < C; c++) {
        float scale = weight[c] / sqrtf(var[c] + eps), m = mean[c], b = bias[c];
        for (i = 0; i < HW; i++) x[(size_t)c * HW + i] = (x[(size_t)c * HW + i] - m) * scale + b;
    }
}
/*@end*/

/*@kernel relu*/
static void lg_relu(float *x, uint32_t n)
{
    uint32_t i;
    for (i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
}
/*@end*/

/*@kernel add*/
static void lg_add(float *x, const float *y, uint32_t n)
{
    uint32_t i;
    for (i = 0; i < n; i++) x[i] += y[i];
}
/*@end*/

/*@kernel shortcut_a*/
/* Option-A shortcut: subsample by 2, zero-pad `pad` channels on each side. */
static void lg_shortcut_a(const float *in, uint32_t C, uint32_t H, uint32_t W, float *out, uint32_t pad)
{
    uint32_t OH = (H + 1) / 2, OW = (W + 1) / 2, c, y, x;
    memset(out, 0, sizeof(float) * (C + 2 * pad) * OH * OW);
    for (c = 0; c < C; c++)
        for (y = 0; y < OH; y++)
            for (x = 0; x < OW; x++) out[((size_t)(c + pad) * OH + y) * OW + x] = in[((size_t)c * H + 2 * y) * W + 2 * x];
}
/*@end*/

/*@kernel maxpool*/
static void lg_maxpool(const float *in, uint32_t C, uint32_t H, uint32_t W, float *out, uint32_t OH, uint32_t OW,
                       uint32_t k, uint32_t s, uint32_t p)
{
    uint32_t c, oy, ox, ky, kx;
    for (c = 0; c < C; c++)
        for (oy = 0; oy < OH; oy++)
            for (ox = 0; ox < OW; ox++) {
                float m = -INFINITY;
                for (ky = 0; ky < k; ky++)
                    for (kx = 0; kx < k; kx++) {
                        int32_t iy = (int32_t)(oy * s + ky) - (int32_t)p, ix = (int32_t)(ox * s + kx) - (int32_t)p;
                        if (iy < 0 || ix < 0 || iy >= (int32_t)H || ix >= (int32_t)W) continue;
                        if (in[((size_t)c * H + (uint32_t)iy) * W + (uint32_t)ix] > m) m = in[((size_t)c * H + (uint32_t)iy) * W + (uint32_t)ix];
                    }
                out[((size_t)c * OH + oy) * OW + ox] = m;
            }
}
/*@end*/

/*@kernel gap*/
static void lg_gap(const float *in, uint32_t C, uint32_t HW, float *out)
{
    uint32_t c, i;
    for (c = 0; c < C; c++) {
        float s = 0.0f;
        for (i = 0; i < HW; i++) s += in[(size_t)c * HW + i];
        out[c] = s / (float)HW;
    }
}
/*@end*/

/*@kernel linear*/
static void lg_linear(const float *in, float *out, const lg_weight *w, const float *bias, float *scratch)
{
    uint32_t r0, o, i, stride;
    for (r0 = 0; r0 < w->rows; r0 += w->br) {
        const float *rows = lg_rows(w, r0, scratch, &stride);
        for (o = r0; o < w->rows && o < r0 + w->br; o++) {
            float acc = bias ? bias[o] : 0.0f;
            for (i = 0; i < w->cols; i++) acc += rows[(size_t)(o - r0) * stride + i] * in[i];
            out[o] = acc;
        }
    }
}
/*@end*/
