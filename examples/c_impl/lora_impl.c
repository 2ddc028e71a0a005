/*
 * A LoRA implementation in C for the lora-ref conformance suite (subprocess protocol).
 *
 *   lora_impl run <case_dir> <out_dir>   read case.json + inputs.safetensors, write outputs.safetensors
 *   lora_impl serve                      persistent mode: one "run <case_dir> <out_dir>" per stdin line,
 *                                        answered "ok", "unsupported <why>" or "error <why>"
 *
 * Exit status: 0 done, 77 unsupported operation, 1 error. Operations: linear.forward,
 * linear.merge, linear.unmerge (fast and exact), in float32, float16 and bfloat16, with the
 * canonical layout (PEFT tensors plus "scale"). Everything is computed in double and rounded
 * once to the case dtype with a correctly rounded double -> float16/bfloat16 conversion.
 * Self-contained: a minimal JSON scanner and safetensors reader/writer, C99 and libm only.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DIMS 8
#define MAX_TENSORS 16

typedef struct {
    char name[64];
    char dtype[8]; /* F32, F16, BF16 */
    int ndim;
    long shape[MAX_DIMS];
    long count;
    double *data; /* widened to double (exact) */
    uint32_t *bits; /* the original bit patterns (for exact restore) */
} Tensor;

static char error_message[8192];

static int fail(const char *message, const char *detail) {
    snprintf(error_message, sizeof error_message, "%s%s%s", message, detail ? ": " : "", detail ? detail : "");
    return 1;
}

/* ---------------------------------------------------------------- minimal JSON scanning */
static const char *skip_ws(const char *p) {
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t') p++;
    return p;
}

static const char *skip_string(const char *p) { /* p at the opening quote */
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && p[1]) p++;
    return *p ? p + 1 : p;
}

static const char *skip_value(const char *p) {
    p = skip_ws(p);
    if (*p == '"') return skip_string(p);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        do {
            if (*p == '"') { p = skip_string(p); continue; }
            if (*p == '{' || *p == '[') depth++;
            if (*p == '}' || *p == ']') depth--;
            p++;
        } while (*p && depth > 0);
        return p;
    }
    while (*p && *p != ',' && *p != '}' && *p != ']') p++;
    return p;
}

/* The value of member `key` of the object at p (p at '{'), or NULL. */
static const char *json_get(const char *p, const char *key) {
    if (!p) return NULL;
    p = skip_ws(p);
    if (*p != '{') return NULL;
    p++;
    size_t len = strlen(key);
    for (;;) {
        p = skip_ws(p);
        if (*p != '"') return NULL;
        const char *name = p + 1, *end = skip_string(p);
        p = skip_ws(end);
        if (*p != ':') return NULL;
        p = skip_ws(p + 1);
        if ((size_t)(end - 1 - name) == len && strncmp(name, key, len) == 0) return p;
        p = skip_ws(skip_value(p));
        if (*p != ',') return NULL;
        p++;
    }
}

static int json_string(const char *p, char *out, size_t size) {
    if (!p || *p != '"') return 0;
    const char *end = skip_string(p);
    size_t n = (size_t)(end - p - 2);
    if (n >= size) return 0;
    memcpy(out, p + 1, n);
    out[n] = 0;
    return 1;
}

static double json_number(const char *p, double fallback) { return p ? strtod(p, NULL) : fallback; }
static int json_true(const char *p) { return p && strncmp(p, "true", 4) == 0; }

/* ---------------------------------------------------------------- float formats */
typedef struct { int precision, emin, ebits; } Format; /* significand bits, min normal exponent, exponent bits */
static const Format F16 = {11, -14, 5}, BF16 = {8, -126, 8};

static double decode_small(uint32_t bits, Format f) {
    int mbits = f.precision - 1, bias = (1 << (f.ebits - 1)) - 1;
    uint32_t sign = bits >> (f.ebits + mbits), exponent = (bits >> mbits) & ((1u << f.ebits) - 1), mantissa = bits & ((1u << mbits) - 1);
    double v;
    if (exponent == (1u << f.ebits) - 1) v = mantissa ? NAN : INFINITY;
    else if (exponent == 0) v = ldexp((double)mantissa, f.emin - mbits);
    else v = ldexp((double)(mantissa | (1u << mbits)), (int)exponent - bias - mbits);
    return sign ? -v : v;
}

/* Round a double to the format once (nearest, ties to even) and return its bit pattern. */
static uint32_t encode_small(double x, Format f) {
    int mbits = f.precision - 1, bias = (1 << (f.ebits - 1)) - 1;
    uint32_t sign = signbit(x) ? 1u << (f.ebits + mbits) : 0, all_ones = (1u << f.ebits) - 1;
    if (isnan(x)) return sign | (all_ones << mbits) | (1u << (mbits - 1));
    double a = fabs(x);
    if (a == 0) return sign;
    int e;
    frexp(a, &e); /* a = m 2^e, m in [0.5, 1) */
    int quantum = (e > f.emin + 1 ? e : f.emin + 1) - f.precision;
    double r = ldexp(nearbyint(ldexp(a, -quantum)), quantum); /* exact scaling; rint rounds half to even */
    double max = ldexp(2.0 - ldexp(1.0, -mbits), (1 << (f.ebits - 1)) - 1);
    if (r > max) return sign | (all_ones << mbits);
    frexp(r, &e);
    if (e - 1 < f.emin) return sign | (uint32_t)ldexp(r, mbits - f.emin); /* subnormal */
    uint32_t mantissa = (uint32_t)(ldexp(r, mbits - (e - 1))) & ((1u << mbits) - 1);
    return sign | ((uint32_t)(e - 1 + bias) << mbits) | mantissa;
}

static int itemsize(const char *dtype) { return strcmp(dtype, "F32") == 0 ? 4 : 2; }

static double decode(uint32_t bits, const char *dtype) {
    if (strcmp(dtype, "F32") == 0) { float v; memcpy(&v, &bits, 4); return v; }
    return decode_small(bits, strcmp(dtype, "F16") == 0 ? F16 : BF16);
}

static uint32_t encode(double x, const char *dtype) {
    if (strcmp(dtype, "F32") == 0) { float v = (float)x; uint32_t b; memcpy(&b, &v, 4); return b; } /* C rounds to nearest */
    return encode_small(x, strcmp(dtype, "F16") == 0 ? F16 : BF16);
}

/* ---------------------------------------------------------------- safetensors */
static char *read_file(const char *path, long *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    *size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buffer = malloc((size_t)*size + 1);
    if (buffer && fread(buffer, 1, (size_t)*size, f) != (size_t)*size) { free(buffer); buffer = NULL; }
    if (buffer) buffer[*size] = 0;
    fclose(f);
    return buffer;
}

static int load_tensors(const char *path, Tensor *tensors, int *n) {
    long size;
    char *raw = read_file(path, &size);
    if (!raw) return fail("cannot read", path);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0 && size >= 8; i--) header_len = header_len << 8 | (unsigned char)raw[i];
    if (size < 8 || header_len > (uint64_t)size - 8) { free(raw); return fail("bad safetensors header", path); }
    char *header = malloc(header_len + 1);
    memcpy(header, raw + 8, header_len);
    header[header_len] = 0;
    const unsigned char *data = (const unsigned char *)raw + 8 + header_len;
    const char *p = skip_ws(header);
    *n = 0;
    if (*p++ != '{') { free(header); free(raw); return fail("header is not an object", path); }
    for (;;) {
        p = skip_ws(p);
        if (*p != '"') break;
        Tensor *t = &tensors[*n];
        memset(t, 0, sizeof *t);
        json_string(p, t->name, sizeof t->name);
        p = skip_ws(skip_string(p));
        p = skip_ws(p + 1); /* ':' */
        const char *entry = p;
        p = skip_ws(skip_value(p));
        if (strcmp(t->name, "__metadata__") != 0) {
            if (*n >= MAX_TENSORS) { free(header); free(raw); return fail("too many tensors", path); }
            json_string(json_get(entry, "dtype"), t->dtype, sizeof t->dtype);
            const char *shape = json_get(entry, "shape"), *offsets = json_get(entry, "data_offsets");
            if (!shape || !offsets) { free(header); free(raw); return fail("tensor entry without shape/offsets", t->name); }
            t->count = 1;
            for (shape = skip_ws(shape + 1); *shape != ']'; shape = skip_ws(shape)) {
                t->shape[t->ndim] = strtol(shape, (char **)&shape, 10);
                t->count *= t->shape[t->ndim++];
                shape = skip_ws(shape);
                if (*shape == ',') shape++;
            }
            long begin = strtol(skip_ws(offsets + 1), (char **)&offsets, 10);
            int is_float = !strcmp(t->dtype, "F32") || !strcmp(t->dtype, "F16") || !strcmp(t->dtype, "BF16");
            if (!is_float) { free(header); free(raw); return fail("unsupported input dtype", t->dtype); }
            t->data = malloc(sizeof(double) * (size_t)(t->count ? t->count : 1));
            t->bits = malloc(sizeof(uint32_t) * (size_t)(t->count ? t->count : 1));
            int width = itemsize(t->dtype);
            for (long i = 0; i < t->count; i++) {
                uint32_t bits = 0;
                for (int b = width - 1; b >= 0; b--) bits = bits << 8 | data[begin + i * width + b]; /* little endian */
                t->bits[i] = bits;
                t->data[i] = decode(bits, t->dtype);
            }
            (*n)++;
        }
        if (*p != ',') break;
        p++;
    }
    free(header);
    free(raw);
    return 0;
}

static Tensor *find(Tensor *tensors, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (strcmp(tensors[i].name, name) == 0) return &tensors[i];
    return NULL;
}

/* Write outputs (bits already in dtype) to <out_dir>/outputs.safetensors. */
static int save_tensors(const char *out_dir, Tensor *outputs, int n) {
    char header[4096] = "{", path[4096];
    long offset = 0;
    for (int i = 0; i < n; i++) {
        char entry[512], shape[256] = "";
        for (int d = 0; d < outputs[i].ndim; d++)
            snprintf(shape + strlen(shape), sizeof shape - strlen(shape), "%s%ld", d ? "," : "", outputs[i].shape[d]);
        long bytes = outputs[i].count * itemsize(outputs[i].dtype);
        snprintf(entry, sizeof entry, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[%ld,%ld]}", i ? "," : "",
                 outputs[i].name, outputs[i].dtype, shape, offset, offset + bytes);
        strcat(header, entry);
        offset += bytes;
    }
    strcat(header, "}");
    while (strlen(header) % 8) strcat(header, " ");
    snprintf(path, sizeof path, "%s/outputs.safetensors.partial", out_dir);
    FILE *f = fopen(path, "wb");
    if (!f) return fail("cannot write", path);
    uint64_t len = strlen(header);
    for (int b = 0; b < 8; b++) fputc((int)(len >> (8 * b) & 0xff), f);
    fwrite(header, 1, len, f);
    for (int i = 0; i < n; i++) {
        int width = itemsize(outputs[i].dtype);
        for (long k = 0; k < outputs[i].count; k++)
            for (int b = 0; b < width; b++) fputc((int)(outputs[i].bits[k] >> (8 * b) & 0xff), f);
    }
    if (fclose(f) != 0) return fail("cannot write", path);
    char final_path[4096];
    snprintf(final_path, sizeof final_path, "%s/outputs.safetensors", out_dir);
    return rename(path, final_path) == 0 ? 0 : fail("cannot rename", final_path);
}

/* ---------------------------------------------------------------- LoRA */
typedef struct { double scale; int fan_in_fan_out, exact; long out, in, r; } Layer;

/* W in [out, in] orientation (stored [in, out] with fan_in_fan_out). */
static double w_at(const Tensor *W, const Layer *L, long o, long i) {
    return L->fan_in_fan_out ? W->data[i * L->out + o] : W->data[o * L->in + i];
}

/* delta in the stored layout of W at flat index k */
static double delta_at(const Tensor *A, const Tensor *B, const Layer *L, long k) {
    long rows = L->fan_in_fan_out ? L->in : L->out, cols = L->fan_in_fan_out ? L->out : L->in;
    long row = k / cols, col = k % cols, o = L->fan_in_fan_out ? col : row, i = L->fan_in_fan_out ? row : col;
    (void)rows;
    double sum = 0;
    for (long j = 0; j < L->r; j++) sum += B->data[o * L->r + j] * A->data[j * L->in + i];
    return L->scale * sum;
}

static Tensor output_like(const char *name, const char *dtype, int ndim, const long *shape) {
    Tensor t;
    memset(&t, 0, sizeof t);
    snprintf(t.name, sizeof t.name, "%s", name);
    snprintf(t.dtype, sizeof t.dtype, "%s", dtype);
    t.ndim = ndim;
    t.count = 1;
    for (int d = 0; d < ndim; d++) t.count *= (t.shape[d] = shape[d]);
    t.bits = calloc((size_t)(t.count ? t.count : 1), sizeof(uint32_t));
    return t;
}

static int forward(Tensor *in, int n, const Layer *L, Tensor *out) {
    Tensor *x = find(in, n, "x"), *W = find(in, n, "W"), *A = find(in, n, "A"), *B = find(in, n, "B");
    Tensor *b = find(in, n, "b"), *lb = find(in, n, "lora_bias"), *mask = find(in, n, "dropout_mask");
    long rows = x->count / L->in, shape[MAX_DIMS];
    for (int d = 0; d < x->ndim - 1; d++) shape[d] = x->shape[d];
    shape[x->ndim - 1] = L->out;
    *out = output_like("y", x->dtype, x->ndim, shape);
    double *h = malloc(sizeof(double) * (size_t)(L->r ? L->r : 1));
    for (long row = 0; row < rows; row++) {
        const double *xr = x->data + row * L->in;
        for (long j = 0; j < L->r; j++) { /* h = (x o mask) A^T */
            double sum = 0;
            for (long i = 0; i < L->in; i++) sum += xr[i] * (mask ? mask->data[row * L->in + i] : 1.0) * A->data[j * L->in + i];
            h[j] = sum;
        }
        for (long o = 0; o < L->out; o++) {
            double base = 0, lora = 0;
            for (long i = 0; i < L->in; i++) base += xr[i] * w_at(W, L, o, i);
            for (long j = 0; j < L->r; j++) lora += h[j] * B->data[o * L->r + j];
            double y = base + (b ? b->data[o] : 0) + L->scale * (lora + (lb ? lb->data[o] : 0));
            out->bits[row * L->out + o] = encode(y, x->dtype);
        }
    }
    free(h);
    return 1;
}

static int merge_like(Tensor *in, int n, const Layer *L, int unmerge, Tensor *out, int *n_out) {
    Tensor *A = find(in, n, "A"), *B = find(in, n, "B");
    if (unmerge && !L->exact) {
        Tensor *Wm = find(in, n, "W_merged");
        out[0] = output_like("W", Wm->dtype, Wm->ndim, Wm->shape);
        for (long k = 0; k < Wm->count; k++) out[0].bits[k] = encode(Wm->data[k] - delta_at(A, B, L, k), Wm->dtype);
        *n_out = 1;
        return 1;
    }
    Tensor *W = find(in, n, "W");
    out[0] = output_like("W_merged", W->dtype, W->ndim, W->shape);
    for (long k = 0; k < W->count; k++) out[0].bits[k] = encode(W->data[k] + delta_at(A, B, L, k), W->dtype);
    *n_out = 1;
    if (unmerge) { /* exact: unmerge our own merge, then put back what did not come back (the residual) */
        out[1] = output_like("W_restored", W->dtype, W->ndim, W->shape);
        for (long k = 0; k < W->count; k++) {
            uint32_t restored = encode(decode(out[0].bits[k], W->dtype) - delta_at(A, B, L, k), W->dtype);
            out[1].bits[k] = restored == W->bits[k] ? restored : W->bits[k];
        }
        *n_out = 2;
    }
    return 1;
}

/* Shapes that do not fit, and non-finite factors at a safe merge, are refused (exit 3), never read out of bounds. */
#define REFUSED 3
static int check_inputs(Tensor *in, int n, const Layer *L, int safe_merge) {
    Tensor *x = find(in, n, "x"), *W = find(in, n, "W"), *Wm = find(in, n, "W_merged"), *A = find(in, n, "A"), *B = find(in, n, "B");
    const char *vectors[] = {"b", "lora_bias"};
    if (B->shape[1] != L->r) return fail("refused: B's columns differ from A's rows", NULL), REFUSED;
    Tensor *weight = W ? W : Wm;
    if (!weight || weight->ndim != 2) return fail("refused: a 2-D weight W or W_merged is required", NULL), REFUSED;
    if (weight->shape[0] != (L->fan_in_fan_out ? L->in : L->out) || weight->shape[1] != (L->fan_in_fan_out ? L->out : L->in))
        return fail("refused: the weight's shape does not fit A and B", weight->name), REFUSED;
    if (x && (x->ndim < 1 || x->shape[x->ndim - 1] != L->in)) return fail("refused: x's last axis is not in_features", NULL), REFUSED;
    for (int v = 0; v < 2; v++) {
        Tensor *t = find(in, n, vectors[v]);
        if (t && t->count != L->out) return fail("refused: a bias whose length is not out_features", vectors[v]), REFUSED;
    }
    Tensor *mask = find(in, n, "dropout_mask");
    if (mask && (!x || mask->count != x->count)) return fail("refused: the dropout mask is not shaped like x", NULL), REFUSED;
    if (safe_merge)
        for (long k = 0; k < A->count + B->count; k++)
            if (!isfinite(k < A->count ? A->data[k] : B->data[k - A->count])) return fail("refused: a non-finite factor at a safe merge", NULL), REFUSED;
    return 0;
}

/* Returns 0 ok, 3 refused, 77 unsupported, 1 error (error_message set). */
static int run_case(const char *case_dir, const char *out_dir) {
    char path[4096], op[64] = "";
    long size;
    snprintf(path, sizeof path, "%s/case.json", case_dir);
    char *json = read_file(path, &size);
    if (!json) return fail("cannot read", path);
    json_string(json_get(json, "operation"), op, sizeof op);
    const char *params = json_get(json, "params");
    int is_forward = !strcmp(op, "linear.forward"), is_merge = !strcmp(op, "linear.merge"), is_unmerge = !strcmp(op, "linear.unmerge");
    if (!is_forward && !is_merge && !is_unmerge) { fail("unsupported operation", op); free(json); return 77; }
    if (!json_get(params, "scale")) { fail("needs the canonical layout (a 'scale' parameter)", NULL); free(json); return 77; }
    Layer L = {json_number(json_get(params, "scale"), 1.0), json_true(json_get(params, "fan_in_fan_out")),
               json_true(json_get(params, "exact")), 0, 0, 0};
    int safe_merge = json_true(json_get(params, "safe_merge"));
    free(json);
    Tensor inputs[MAX_TENSORS], outputs[2];
    int n = 0, n_out = 1;
    snprintf(path, sizeof path, "%s/inputs.safetensors", case_dir);
    if (load_tensors(path, inputs, &n)) return 1;
    Tensor *A = find(inputs, n, "A"), *B = find(inputs, n, "B");
    if (!A || !B || A->ndim != 2 || B->ndim != 2) return fail("inputs A and B (2-D) are required", NULL);
    L.r = A->shape[0];
    L.in = A->shape[1];
    L.out = B->shape[0];
    int refused = check_inputs(inputs, n, &L, safe_merge);
    if (refused) {
        for (int i = 0; i < n; i++) { free(inputs[i].data); free(inputs[i].bits); }
        return refused;
    }
    if (is_forward) forward(inputs, n, &L, &outputs[0]);
    else merge_like(inputs, n, &L, is_unmerge, outputs, &n_out);
    int status = save_tensors(out_dir, outputs, n_out);
    for (int i = 0; i < n; i++) { free(inputs[i].data); free(inputs[i].bits); }
    for (int i = 0; i < n_out; i++) free(outputs[i].bits);
    return status;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "run") == 0) {
        int status = run_case(argv[2], argv[3]);
        if (status) fprintf(stderr, "%s\n", error_message);
        return status;
    }
    if (argc == 2 && strcmp(argv[1], "serve") == 0) {
        char line[8192], case_dir[4096], out_dir[4096];
        while (fgets(line, sizeof line, stdin)) {
            if (sscanf(line, "run %4095s %4095s", case_dir, out_dir) != 2) { printf("error malformed request\n"); fflush(stdout); continue; }
            int status = run_case(case_dir, out_dir);
            printf(status == 0 ? "ok\n" : status == 77 ? "unsupported %s\n" : status == REFUSED ? "refused %s\n" : "error %s\n", error_message);
            fflush(stdout);
        }
        return 0;
    }
    fprintf(stderr, "usage: %s run <case_dir> <out_dir> | %s serve\n", argv[0], argv[0]);
    return 2;
}
