/*@kernel common*/
/* What happens to each result before it is stored: act(x * mul[c] + add[c]) for channel c
 * (mul NULL: 1, add NULL: 0). act: 0 none, 1 clamp to [lo, hi], 2 SiLU, 3 hardswish,
 * 4 hardsigmoid, 5 sigmoid, 6 tanh, 7 leaky ReLU of slope lo. The formulas are PyTorch's. */
typedef struct {
    const float *mul, *add;
    uint32_t act;
    float lo, hi;
} lg_post;

static float lg_activate(float v, const lg_post *p)
{
    float t;
    switch (p->act) {
    case 1: return v < p->lo ? p->lo : (v > p->hi ? p->hi : v);
    case 2: return v / (1.0f + expf(-v));
    case 3: t = v + 3.0f; t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t); return v * t / 6.0f;
    case 4: t = v + 3.0f; t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t); return t / 6.0f;
    case 5: return 1.0f / (1.0f + expf(-v));
    case 6: return tanhf(v);
    case 7: return v > 0.0f ? v : v * p->lo;
    default: return v;
    }
}

static float lg_apply(float v, uint32_t c, const lg_post *p)
{
    if (p->mul) v = v * p->mul[c];
    if (p->add) v = v + p->add[c];
    return lg_activate(v, p);
}
/*@end*/

/*@kernel weights*/
/* A weight matrix (rows = output channels, cols = the rest flattened), dense or as br x bc blocks:
 * per block a width-bit codebook index, bit-packed little-endian (the .lego file's layout; block n
 * at bits [n*width, (n+1)*width), blocks row-major over the grid), with optional per-row gains.
 * Value formats: 0 float32, 1 float16 bits, 2 bfloat16 bits, 3 int8 times values_scale; gain
 * formats: 0, 1, or 4: a byte of sign (bit 7) and index into gain_levels (bits 0-6). round_to: the
 * dtype (1 float16, 2 bfloat16) a gain-scaled value is rounded to, 0 for none. */
typedef struct {
    const void *values;       /* dense: rows x cols; clustered: the codebook, K x (br*bc) */
    const uint8_t *packed;    /* clustered: the block indices; NULL when dense */
    const void *gains;        /* per-row gains, or NULL */
    const float *gain_levels; /* magnitudes of log-coded gains */
    float values_scale;
    uint32_t rows, cols, br, bc, grid_cols, width;
    uint32_t format, gain_format, round_to;
} lg_weight;

static float lg_half(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    float f;
    if (exponent == 0) {  /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13) : ((exponent + 112u) << 23) | (mantissa << 13));
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float lg_bf16(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* v rounded to nearest-even float16 (mode 1) or bfloat16 (mode 2), as a float32. */
static float lg_round16(float v, uint32_t mode)
{
    uint32_t bits, sign;
    float a;
    memcpy(&bits, &v, sizeof bits);
    if (mode == 2) {
        bits += 0x7fffu + ((bits >> 16) & 1u);
        bits &= 0xffff0000u;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    sign = bits & 0x80000000u;
    bits ^= sign;
    memcpy(&a, &bits, sizeof a);
    if (a < 6.103515625e-05f) {
        a = (a + 0.5f) - 0.5f;  /* float16 subnormals are multiples of 2^-24, float32's step at 0.5 */
    } else {
        bits += 0xfffu + ((bits >> 13) & 1u);  /* keep 11 significant bits */
        bits &= 0xffffe000u;
        memcpy(&a, &bits, sizeof a);
        if (a > 65504.0f) a = INFINITY;
    }
    memcpy(&bits, &a, sizeof bits);
    bits |= sign;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* Index of block n: the packed arrays are padded so that these reads stay inside them. */
static uint32_t lg_index(const uint8_t *packed, uint32_t n, uint32_t width)
{
    uint32_t bit = n * width;
    const uint8_t *q = packed + (bit >> 3);
    if (width == 8) return q[0];
    if (width == 16) return (uint32_t)q[0] | (uint32_t)q[1] << 8;
    if (width <= 25) {
        uint32_t v = (uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 | (uint32_t)q[3] << 24;
        return (v >> (bit & 7u)) & ((1u << width) - 1u);
    } else {
        uint64_t v = 0;
        uint32_t i;
        for (i = 0; i < 8; i++) v |= (uint64_t)q[i] << (8u * i);
        return (uint32_t)((v >> (bit & 7u)) & ((1ull << width) - 1ull));
    }
}

static float lg_value(const lg_weight *w, size_t i)
{
    switch (w->format) {
    case 1: return lg_half(((const uint16_t *)w->values)[i]);
    case 2: return lg_bf16(((const uint16_t *)w->values)[i]);
    case 3: return (float)((const int8_t *)w->values)[i] * w->values_scale;
    default: return ((const float *)w->values)[i];
    }
}

static float lg_gain(const lg_weight *w, uint32_t r)
{
    uint8_t code;
    switch (w->gain_format) {
    case 1: return lg_half(((const uint16_t *)w->gains)[r]);
    case 4:
        code = ((const uint8_t *)w->gains)[r];
        return (code & 0x80u) ? -w->gain_levels[code & 0x7fu] : w->gain_levels[code & 0x7fu];
    default: return ((const float *)w->gains)[r];
    }
}

/* Row r of the weight (cols floats): read in place when dense float32, else decoded into scratch. */
static const float *lg_row(const lg_weight *w, uint32_t r, float *scratch)
{
    uint32_t j, b, col = 0, first, within;
    float g;
    if (!w->packed) {
        if (w->format == 0) return (const float *)w->values + (size_t)r * w->cols;
        for (col = 0; col < w->cols; col++) scratch[col] = lg_value(w, (size_t)r * w->cols + col);
        return scratch;
    }
    g = w->gains ? lg_gain(w, r) : 1.0f;
    first = (r / w->br) * w->grid_cols;
    within = r % w->br;
    for (j = 0; j < w->grid_cols; j++) {
        size_t base = ((size_t)lg_index(w->packed, first + j, w->width) * w->br + within) * w->bc;
        for (b = 0; b < w->bc && col < w->cols; b++, col++) {
            float v = lg_value(w, base + b);
            if (w->gains) {
                v = v * g;
                if (w->round_to) v = lg_round16(v, w->round_to);
            }
            scratch[col] = v;
        }
    }
    return scratch;
}
/*@end*/

/*@kernel conv*/
typedef struct {
    uint32_t C, H, W, O, OH, OW, kh, kw, sh, sw, dh, dw, pt, pl, groups;
    lg_post post;
} lg_conv_params;

/* The taps k in [*lo, *hi) of a kernel of n taps (spacing d) whose input o*s + k*d - p lies in [0, size). */
static void lg_taps(uint32_t o, uint32_t s, uint32_t d, uint32_t p, uint32_t n, uint32_t size, uint32_t *lo, uint32_t *hi)
{
    int32_t first = (int32_t)p - (int32_t)(o * s), last = (int32_t)size - 1 + first;
    uint32_t a = first <= 0 ? 0u : ((uint32_t)first + d - 1u) / d, b = last < 0 ? 0u : (uint32_t)last / d + 1u;
    if (b > n) b = n;
    *lo = a;
    *hi = a < b ? b : a;
}

/* Output (oy, ox) of four output channels of one group (weight rows r[0..3]): over the group's
 * input channels and the kernel taps inside the input (zero padding adds nothing), weight times
 * input in that order, each input read once for the four. */
static void lg_conv_channels(const float *group, const float *const *r, const lg_conv_params *p, uint32_t oy,
                             uint32_t ox, float *acc)
{
    uint32_t cpg = p->C / p->groups, plane = p->H * p->W, taps = p->kh * p->kw, c, ky, kx, y0, y1, x0, x1;
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3];
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    if (taps == 1 && p->pt == 0 && p->pl == 0) { /* 1x1: a product over channels */
        const float *ip = group + (size_t)oy * p->sh * p->W + ox * p->sw;
        for (c = 0; c < cpg; c++, ip += plane) {
            float v = *ip;
            a0 += r0[c] * v;
            a1 += r1[c] * v;
            a2 += r2[c] * v;
            a3 += r3[c] * v;
        }
    } else {
        lg_taps(oy, p->sh, p->dh, p->pt, p->kh, p->H, &y0, &y1);
        lg_taps(ox, p->sw, p->dw, p->pl, p->kw, p->W, &x0, &x1);
        for (c = 0; c < cpg; c++) {
            for (ky = y0; ky < y1; ky++) {
                const float *ip = group + (size_t)c * plane + (size_t)(oy * p->sh + ky * p->dh - p->pt) * p->W
                                  + (ox * p->sw + x0 * p->dw - p->pl);
                size_t k = (size_t)c * taps + ky * p->kw + x0;
                for (kx = x0; kx < x1; kx++, k++, ip += p->dw) {
                    float v = *ip;
                    a0 += r0[k] * v;
                    a1 += r1[k] * v;
                    a2 += r2[k] * v;
                    a3 += r3[k] * v;
                }
            }
        }
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
}

/* Outputs (ox..ox+3) along x of one channel of a depthwise convolution, all of whose inputs along
 * x are in bounds when four is nonzero; else output ox alone over the taps inside the input. */
static void lg_depthwise_outputs(const float *channel, const float *wr, const lg_conv_params *p, uint32_t oy,
                                 uint32_t ox, uint32_t four, float *acc)
{
    uint32_t s = p->sw, ky, kx, y0, y1, x0, x1;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    lg_taps(oy, p->sh, p->dh, p->pt, p->kh, p->H, &y0, &y1);
    lg_taps(ox, s, p->dw, p->pl, p->kw, p->W, &x0, &x1);
    for (ky = y0; ky < y1; ky++) {
        const float *wp = wr + ky * p->kw;
        const float *ip = channel + (size_t)(oy * p->sh + ky * p->dh - p->pt) * p->W + (ox * s + x0 * p->dw - p->pl);
        if (four) {
            for (kx = x0; kx < x1; kx++, ip += p->dw) {
                float w = wp[kx];
                a0 += w * ip[0];
                a1 += w * ip[s];
                a2 += w * ip[2 * s];
                a3 += w * ip[3 * s];
            }
        } else {
            for (kx = x0; kx < x1; kx++, ip += p->dw) a0 += wp[kx] * *ip;
        }
    }
    acc[0] = a0;
    acc[1] = a1;
    acc[2] = a2;
    acc[3] = a3;
}

/* Direct convolution, zero padding never materialised. Output channels are taken four at a time
 * (their weight rows decoded once into the scratch), so that each input value read serves four
 * accumulators; a depthwise convolution (one input channel per output) instead takes four outputs
 * along x at a time. The scratch holds four weight rows. */
static void lg_conv2d(const float *in, float *out, const lg_weight *w, const lg_conv_params *p, float *scratch)
{
    uint32_t cpg = p->C / p->groups, opg = p->O / p->groups, plane = p->OH * p->OW, o, oy, ox, j, n;
    float acc[4];
    if (cpg == 1 && opg == 1) {
        uint32_t span = (p->kw - 1) * p->dw, x_lo = (p->pl + p->sw - 1) / p->sw;
        /* ox in [x_lo, x_hi): ox*sw - pl >= 0 and ox*sw - pl + span < W */
        uint32_t x_hi = p->W + p->pl > span ? (p->W + p->pl - span - 1) / p->sw + 1 : 0;
        if (x_hi > p->OW) x_hi = p->OW;
        for (o = 0; o < p->O; o++) {
            const float *wr = lg_row(w, o, scratch), *channel = in + (size_t)o * p->H * p->W;
            float *op = out + (size_t)o * plane;
            for (oy = 0; oy < p->OH; oy++, op += p->OW)
                for (ox = 0; ox < p->OW;) {
                    uint32_t four = ox >= x_lo && ox + 4 <= x_hi;
                    lg_depthwise_outputs(channel, wr, p, oy, ox, four, acc);
                    for (j = 0; j < (four ? 4u : 1u); j++, ox++) op[ox] = lg_apply(acc[j], o, &p->post);
                }
        }
        return;
    }
    for (o = 0; o < p->O; o += n) {
        const float *rows[4];
        const float *group = in + (size_t)(o / opg) * cpg * p->H * p->W;
        n = opg - o % opg < 4 ? opg - o % opg : 4; /* the four stay in one group */
        for (j = 0; j < 4; j++) rows[j] = j < n ? lg_row(w, o + j, scratch + (size_t)j * w->cols) : rows[0];
        for (oy = 0; oy < p->OH; oy++)
            for (ox = 0; ox < p->OW; ox++) {
                lg_conv_channels(group, rows, p, oy, ox, acc);
                for (j = 0; j < n; j++) out[(size_t)(o + j) * plane + oy * p->OW + ox] = lg_apply(acc[j], o + j, &p->post);
            }
    }
}
/*@end*/

/*@kernel linear*/
/* out[m][o] = post(sum_i in[m][i] * w[o][i]) for the M rows of the input, four outputs at a time
 * (their rows decoded once into the scratch, which holds four). */
static void lg_linear(const float *in, float *out, const lg_weight *w, uint32_t M, const lg_post *post, float *scratch)
{
    uint32_t o, m, i, j, n;
    for (o = 0; o < w->rows; o += n) {
        const float *r[4];
        n = w->rows - o < 4 ? w->rows - o : 4;
        for (j = 0; j < 4; j++) r[j] = j < n ? lg_row(w, o + j, scratch + (size_t)j * w->cols) : r[0];
        for (m = 0; m < M; m++) {
            const float *x = in + (size_t)m * w->cols;
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (i = 0; i < w->cols; i++) {
                float v = x[i];
                a[0] += r[0][i] * v;
                a[1] += r[1][i] * v;
                a[2] += r[2][i] * v;
                a[3] += r[3][i] * v;
            }
            for (j = 0; j < n; j++) out[(size_t)m * w->rows + o + j] = lg_apply(a[j], o + j, post);
        }
    }
}
/*@end*/

/*@kernel pointwise*/
/* out = post(in) over C channels of HW values (out may be in). */
static void lg_pointwise(const float *in, float *out, uint32_t C, uint32_t HW, const lg_post *post)
{
    uint32_t c, i;
    for (c = 0; c < C; c++)
        for (i = 0; i < HW; i++) out[(size_t)c * HW + i] = lg_apply(in[(size_t)c * HW + i], c, post);
}
/*@end*/

/*@kernel scalar*/
/* out = post(in op s), op: 0 x+s, 1 x-s, 2 s-x, 3 x*s, 4 x/s, 5 s/x (out may be in). */
static void lg_scalar(const float *in, float *out, uint32_t n, uint32_t op, float s, const lg_post *post)
{
    uint32_t i;
    for (i = 0; i < n; i++) {
        float x = in[i], v;
        switch (op) {
        case 0: v = x + s; break;
        case 1: v = x - s; break;
        case 2: v = s - x; break;
        case 3: v = x * s; break;
        case 4: v = x / s; break;
        default: v = s / x; break;
        }
        out[i] = lg_activate(v, post);
    }
}
/*@end*/

/*@kernel binary*/
/* out = post(a op b) over C channels of HW values, op: 0 add, 1 sub, 2 mul, 3 div; an operand is
 * full (a_full/b_full 1) or one value per channel (0), as in squeeze-excitation. out may be a or b. */
static void lg_binary(const float *a, const float *b, float *out, uint32_t C, uint32_t HW, uint32_t a_full,
                      uint32_t b_full, uint32_t op, const lg_post *post)
{
    uint32_t c, i;
    for (c = 0; c < C; c++) {
        const float *ac = a_full ? a + (size_t)c * HW : a + c, *bc = b_full ? b + (size_t)c * HW : b + c;
        float *oc = out + (size_t)c * HW;
        for (i = 0; i < HW; i++) {
            float x = ac[i * a_full], y = bc[i * b_full], v;
            switch (op) {
            case 0: v = x + y; break;
            case 1: v = x - y; break;
            case 2: v = x * y; break;
            default: v = x / y; break;
            }
            oc[i] = lg_activate(v, post);
        }
    }
}
/*@end*/

/*@kernel pool*/
typedef struct {
    uint32_t C, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, count_pad, divisor;
} lg_pool_params;
/*@end*/

/*@kernel maxpool*/
static void lg_maxpool(const float *in, float *out, const lg_pool_params *p)
{
    uint32_t c, oy, ox, ky, kx;
    for (c = 0; c < p->C; c++)
        for (oy = 0; oy < p->OH; oy++)
            for (ox = 0; ox < p->OW; ox++) {
                float m = -INFINITY;
                for (ky = 0; ky < p->kh; ky++) {
                    int32_t iy = (int32_t)(oy * p->sh + ky * p->dh) - (int32_t)p->ph;
                    if (iy < 0 || iy >= (int32_t)p->H) continue;
                    for (kx = 0; kx < p->kw; kx++) {
                        int32_t ix = (int32_t)(ox * p->sw + kx * p->dw) - (int32_t)p->pw;
                        float v;
                        if (ix < 0 || ix >= (int32_t)p->W) continue;
                        v = in[((size_t)c * p->H + (uint32_t)iy) * p->W + (uint32_t)ix];
                        if (v > m) m = v;
                    }
                }
                out[((size_t)c * p->OH + oy) * p->OW + ox] = m;
            }
}
/*@end*/

/*@kernel avgpool*/
/* PyTorch's rule: the divisor counts the window clipped to the padded input (count_pad) or to the
 * input, unless divisor is nonzero. */
static void lg_avgpool(const float *in, float *out, const lg_pool_params *p)
{
    uint32_t c, oy, ox;
    int32_t y, x;
    for (c = 0; c < p->C; c++)
        for (oy = 0; oy < p->OH; oy++)
            for (ox = 0; ox < p->OW; ox++) {
                int32_t y0 = (int32_t)(oy * p->sh) - (int32_t)p->ph, x0 = (int32_t)(ox * p->sw) - (int32_t)p->pw;
                int32_t y1 = y0 + (int32_t)p->kh, x1 = x0 + (int32_t)p->kw;
                int32_t count;
                float sum = 0.0f;
                if (y1 > (int32_t)(p->H + p->ph)) y1 = (int32_t)(p->H + p->ph);
                if (x1 > (int32_t)(p->W + p->pw)) x1 = (int32_t)(p->W + p->pw);
                count = (y1 - y0) * (x1 - x0);
                if (y0 < 0) y0 = 0;
                if (x0 < 0) x0 = 0;
                if (y1 > (int32_t)p->H) y1 = (int32_t)p->H;
                if (x1 > (int32_t)p->W) x1 = (int32_t)p->W;
                for (y = y0; y < y1; y++)
                    for (x = x0; x < x1; x++) sum += in[((size_t)c * p->H + (uint32_t)y) * p->W + (uint32_t)x];
                if (p->divisor) count = (int32_t)p->divisor;
                else if (!p->count_pad) count = (y1 - y0) * (x1 - x0);
                out[((size_t)c * p->OH + oy) * p->OW + ox] = sum / (float)count;
            }
}
/*@end*/

/*@kernel mean*/
static void lg_mean(const float *in, float *out, uint32_t C, uint32_t HW)
{
    uint32_t c, i;
    for (c = 0; c < C; c++) {
        float s = 0.0f;
        for (i = 0; i < HW; i++) s += in[(size_t)c * HW + i];
        out[c] = s / (float)HW;
    }
}
/*@end*/

/*@kernel pad*/
/* The C x H x W input placed at (c0, h0, w0) of an OC x OH x OW output filled with value. */
static void lg_pad(const float *in, float *out, uint32_t C, uint32_t H, uint32_t W, uint32_t OC, uint32_t OH,
                   uint32_t OW, uint32_t c0, uint32_t h0, uint32_t w0, float value)
{
    size_t i, n = (size_t)OC * OH * OW;
    uint32_t c, y;
    for (i = 0; i < n; i++) out[i] = value;
    for (c = 0; c < C; c++)
        for (y = 0; y < H; y++)
            memcpy(out + ((size_t)(c + c0) * OH + y + h0) * OW + w0, in + ((size_t)c * H + y) * W, sizeof(float) * W);
}
/*@end*/

/*@kernel slice*/
/* out[c][y][x] = in[c0 + c*cs][h0 + y*hs][w0 + x*ws] for an H x W input and OC x OH x OW output. */
static void lg_slice(const float *in, float *out, uint32_t H, uint32_t W, uint32_t OC, uint32_t OH, uint32_t OW,
                     uint32_t c0, uint32_t h0, uint32_t w0, uint32_t cs, uint32_t hs, uint32_t ws)
{
    uint32_t c, y, x;
    for (c = 0; c < OC; c++)
        for (y = 0; y < OH; y++)
            for (x = 0; x < OW; x++)
                *out++ = in[((size_t)(c0 + c * cs) * H + h0 + y * hs) * W + w0 + x * ws];
}
/*@end*/

/*@kernel concat*/
/* outer chunks of n floats from in to out, the out chunks stride floats apart. */
static void lg_copy(const float *in, float *out, uint32_t outer, uint32_t n, uint32_t stride)
{
    uint32_t o;
    for (o = 0; o < outer; o++) memcpy(out + (size_t)o * stride, in + (size_t)o * n, sizeof(float) * n);
}
/*@end*/
