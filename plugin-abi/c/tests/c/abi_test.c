/*
 * The C ABI as a C host uses it: every exported function of tiller.h, its error paths, and the
 * steered activations against values computed here from the dictionary's weights.
 *
 * Run by plugin-abi/c/tests/c_abi.rs (plainly and under Valgrind) as `abi_test <fixtures>`, where
 * <fixtures> holds what c_abi.rs writes: dict.onnx, weights.bin, tiller.toml, reload.toml and
 * bad.toml. Every check runs even after one fails; the program prints each mismatch with its line
 * and exits 1 if there was any.
 *
 * The config (c_abi.rs CONFIG): dictionary `res` (a ReLU SAE with b_dec subtracted from the input)
 * at hook `layer.0`; monitor `stopper` stops a request when feature 7 exceeds 3.0 on a token;
 * profile `clamp` clamps feature 3 to 2.5 (1.0 after reload.toml); profile `boost` adds 1.5 times
 * decoder row 5 to generated tokens. Request 3 also gets a per-request override that ablates
 * feature 20, which the config does not name: its steps run the full dictionary through ONNX
 * Runtime instead of the sliced native encoder.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tiller.h"

#define HOOK "layer.0"
#define STOP_FEATURE 7
#define STOP_THRESHOLD 3.0
#define CLAMP_FEATURE 3
#define BOOST_FEATURE 5
#define BOOST_STRENGTH 1.5
#define ABLATE_FEATURE 20
#define OVERRIDES "{\"steer\": [{\"name\": \"ov-ablate\", \"dictionary\": \"res\", \"op\": \"ablate\", \"feature\": 20}]}"
/* Normwise tolerances of one row (max |got - want| / max |want|): f32 host memory is edited in
 * f32; f16 and bf16 rows are rounded once more when written back (half an ulp: 2^-11, 2^-8). */
#define TOL_F32 1e-4
#define TOL_F16 1e-3
#define TOL_BF16 8e-3
#define MAX_TOKENS 16
#define MAX_REQUESTS 16

static int checks, failures;

static void failf(int line, const char *fmt, ...) {
  va_list ap;
  failures++;
  fprintf(stderr, "abi_test.c:%d: FAIL: ", line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
}

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    checks++;                                                                                      \
    if (!(cond)) failf(__LINE__, __VA_ARGS__);                                                     \
  } while (0)

static const char *status_name(tiller_status s) {
  switch (s) {
  case TILLER_OK: return "TILLER_OK";
  case TILLER_NULL_ARGUMENT: return "TILLER_NULL_ARGUMENT";
  case TILLER_INVALID_ARGUMENT: return "TILLER_INVALID_ARGUMENT";
  case TILLER_NOT_FOUND: return "TILLER_NOT_FOUND";
  case TILLER_CONFIG: return "TILLER_CONFIG";
  case TILLER_DICTIONARY: return "TILLER_DICTIONARY";
  case TILLER_ONNXRUNTIME: return "TILLER_ONNXRUNTIME";
  case TILLER_IO: return "TILLER_IO";
  case TILLER_BUFFER_TOO_SMALL: return "TILLER_BUFFER_TOO_SMALL";
  case TILLER_PANIC: return "TILLER_PANIC";
  case TILLER_UNSUPPORTED: return "TILLER_UNSUPPORTED";
  default: return "(not a tiller_status)";
  }
}

/* The calling thread's last error message, in a static buffer. */
static const char *last_error(void) {
  static char buf[8192];
  size_t needed = 0;
  tiller_status s = tiller_last_error(buf, sizeof buf, &needed);
  if (s != TILLER_OK)
    snprintf(buf, sizeof buf, "<tiller_last_error: %s, needed %zu>", status_name(s), needed);
  return buf;
}

static int expect_at(int line, const char *call, tiller_status got, tiller_status want) {
  checks++;
  if (got == want) return 1;
  failf(line, "%s returned %s, expected %s (last error: %s)", call, status_name(got),
        status_name(want), last_error());
  return 0;
}

/* EXPECT(call, status): the call returns that status. */
#define EXPECT(call, want) expect_at(__LINE__, #call, (call), (want))

/* The last error contains `needle`. */
#define EXPECT_ERROR_HAS(needle)                                                                   \
  do {                                                                                             \
    const char *msg_ = last_error();                                                               \
    CHECK(strstr(msg_, (needle)) != NULL, "last error \"%s\" does not mention \"%s\"", msg_,      \
          (needle));                                                                               \
  } while (0)

/* ---------------------------------------------------------------------------------------------- */
/* Fixtures and the reference maths.                                                              */

static const char *dir;
static size_t D, F;
static float *w_enc, *b_enc, *w_dec, *b_dec; /* [D,F], [F], [F,D], [D] */

static char *path_in(const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (!p) abort();
  snprintf(p, n, "%s/%s", dir, name);
  return p;
}

static char *read_file(const char *name, size_t *len) {
  char *path = path_in(name);
  FILE *f = fopen(path, "rb");
  if (!f) {
    fprintf(stderr, "abi_test: cannot open %s\n", path);
    exit(2);
  }
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
    fprintf(stderr, "abi_test: cannot read %s\n", path);
    exit(2);
  }
  buf[n] = 0;
  fclose(f);
  free(path);
  if (len) *len = (size_t)n;
  return buf;
}

static float le_f32(const unsigned char *p) {
  uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static float *take(const unsigned char **p, size_t n) {
  float *out = malloc(n * sizeof *out);
  if (!out) abort();
  for (size_t i = 0; i < n; i++, *p += 4) out[i] = le_f32(*p);
  return out;
}

static void load_weights(void) {
  size_t len;
  char *raw = read_file("weights.bin", &len);
  const unsigned char *p = (const unsigned char *)raw;
  uint32_t d, f;
  memcpy(&d, p, 4); /* little-endian hosts only, as the runtime */
  memcpy(&f, p + 4, 4);
  D = d;
  F = f;
  if (len != 8 + 4 * (D * F * 2 + F + D) || D > 64 || F <= ABLATE_FEATURE) {
    fprintf(stderr, "abi_test: weights.bin has %zu bytes for d %zu, f %zu\n", len, D, F);
    exit(2);
  }
  p += 8;
  w_enc = take(&p, D * F);
  b_enc = take(&p, F);
  w_dec = take(&p, F * D);
  b_dec = take(&p, D);
  free(raw);
}

/* f_j(x) = relu((x - b_dec) · W_enc[:, j] + b_enc[j]), in double. */
static double feature(const float *x, size_t j) {
  double pre = b_enc[j];
  for (size_t i = 0; i < D; i++) pre += ((double)x[i] - b_dec[i]) * w_enc[i * F + j];
  return pre > 0 ? pre : 0;
}

enum op { CLAMP, ADD, ABLATE };
struct rule {
  enum op op;
  size_t feature;
  double param;
  int generated_only;
  const char *name;
};

/* The rules of each request, as the runtime should apply them. `clamp_value` follows reloads. */
static double clamp_value = 2.5;

static size_t rules_of(uint64_t id, struct rule out[2]) {
  struct rule clamp = {CLAMP, CLAMP_FEATURE, clamp_value, 0, "clamp-3"};
  struct rule boost = {ADD, BOOST_FEATURE, BOOST_STRENGTH, 1, "boost-5"};
  struct rule ablate = {ABLATE, ABLATE_FEATURE, 0, 0, "ov-ablate"};
  switch (id) {
  case 1:
  case 10: out[0] = clamp; return 1;
  case 2: out[0] = boost; return 1;
  case 3: out[0] = clamp; out[1] = ablate; return 2;
  default: return 0; /* 4, 5, 6: no profile */
  }
}

/* Expected tallies: the summary's steering counts and the metrics. */
static uint64_t edits[MAX_REQUESTS][2];
static uint64_t hook_tokens; /* tiller_tokens_total{hook="layer.0"} of the runtime from file */
static uint64_t clamp_edits_total, override_edits_total;

/* The requests the monitor should stop in the open step. */
static uint64_t want_stop[MAX_TOKENS];
static size_t n_want_stop;

/* Applies the rules of token (id, phase) to `x` (double), counting the edits; returns how many
 * applied. Features are read from the unedited row, as the runtime encodes before editing. */
static int reference_row(const float *x, uint64_t id, uint8_t phase, double *out, int count) {
  struct rule rules[2];
  size_t n = rules_of(id, rules);
  int applied = 0;
  for (size_t i = 0; i < D; i++) out[i] = x[i];
  for (size_t r = 0; r < n; r++) {
    if (rules[r].generated_only && phase != TILLER_GENERATED) continue;
    double f = feature(x, rules[r].feature);
    double c = rules[r].op == CLAMP ? rules[r].param - f : rules[r].op == ADD ? rules[r].param : -f;
    if ((float)c == 0.0f) continue; /* the runtime skips (and does not count) a zero edit */
    for (size_t i = 0; i < D; i++) out[i] += c * w_dec[rules[r].feature * D + i];
    applied++;
    if (count) {
      edits[id][r]++;
      if (rules[r].op == ABLATE)
        override_edits_total++;
      else if (rules[r].op == CLAMP && id != 10)
        clamp_edits_total++;
    }
  }
  if (count && feature(x, STOP_FEATURE) > STOP_THRESHOLD) {
    size_t k = 0;
    while (k < n_want_stop && want_stop[k] != id) k++;
    if (k == n_want_stop) want_stop[n_want_stop++] = id;
  }
  return applied;
}

/* ---------------------------------------------------------------------------------------------- */
/* float16 and bfloat16, round to nearest even.                                                   */

static float half_to_float(uint16_t h) {
  int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  float v = exp == 0    ? ldexpf((float)man, -24)
            : exp == 31 ? (man ? NAN : INFINITY)
                        : ldexpf((float)(man | 0x400), exp - 25);
  return (h & 0x8000) ? -v : v;
}

static uint16_t float_to_half(float f) {
  uint16_t sign = signbit(f) ? 0x8000 : 0;
  float a = fabsf(f);
  if (a == 0) return sign;
  int e;
  frexpf(a, &e); /* a = m·2^e, m in [0.5, 1) */
  int exp = e - 1 + 15;
  if (exp <= 0) return (uint16_t)(sign | (uint16_t)rintf(ldexpf(a, 24)));
  uint32_t m = (uint32_t)rintf(ldexpf(a, 11 - e)); /* [1024, 2048] */
  if (m == 2048) {
    m = 1024;
    exp++;
  }
  if (exp >= 31) return sign | 0x7c00;
  return (uint16_t)(sign | (uint16_t)(exp << 10) | (uint16_t)(m - 1024));
}

static float bf16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

/* ---------------------------------------------------------------------------------------------- */
/* Activations and steps.                                                                         */

static uint64_t rng_state = 0x1234567;

static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}

static float normal(void) {
  return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

/* Fills `n` rows; a row whose request is `stop_id` is made to fire the stop monitor. */
static void fill(float *x, size_t n, const uint64_t *ids, uint64_t stop_id) {
  for (size_t t = 0; t < n; t++) {
    float *row = x + t * D;
    for (size_t i = 0; i < D; i++) row[i] = normal();
    if (ids[t] == stop_id) /* b_dec + 8·W_enc[:, 7]: feature 7 ≈ 8·‖W_enc[:, 7]‖² */
      for (size_t i = 0; i < D; i++) row[i] = b_dec[i] + 8.0f * w_enc[i * F + STOP_FEATURE];
  }
}

static tiller_step *open_step(const tiller_runtime *rt, const uint64_t *ids, const uint8_t *ph,
                              size_t n, int line) {
  tiller_step *step = NULL;
  n_want_stop = 0;
  if (!expect_at(line, "tiller_step_open", tiller_step_open(rt, ids, ph, n, &step), TILLER_OK))
    return NULL;
  CHECK(step != NULL, "tiller_step_open gave no step (line %d)", line);
  return step;
}

/* The requests a step says to stop against the reference's. */
static void check_stops(const uint64_t *stop, size_t n_stop, int line) {
  CHECK(n_stop == n_want_stop, "step closed at line %d: %zu requests to stop, expected %zu", line,
        n_stop, n_want_stop);
  for (size_t i = 0; i < n_want_stop && i < n_stop; i++) {
    int found = 0;
    for (size_t k = 0; k < n_stop; k++) found |= stop[k] == want_stop[i];
    CHECK(found, "step closed at line %d: request %llu not in the stop list", line,
          (unsigned long long)want_stop[i]);
  }
}

/* Closes a step and checks the requests it says to stop against the reference. */
static void close_step(tiller_step *step, int line) {
  uint64_t stop[MAX_TOKENS];
  size_t n_stop = 12345;
  if (!step) return;
  if (!expect_at(line, "tiller_step_close", tiller_step_close(step, stop, MAX_TOKENS, &n_stop),
                 TILLER_OK))
    return;
  check_stops(stop, n_stop, line);
}

static double row_error(const double *want, const float *got, double *scale) {
  double err = 0, s = 0;
  for (size_t i = 0; i < D; i++) {
    err = fmax(err, fabs(got[i] - want[i]));
    s = fmax(s, fabs(want[i]));
  }
  *scale = s;
  return s > 0 ? err / s : err;
}

/* Compares every f32 row `x` a hook edited from `before` with the reference (which tallies the
 * edits); a row no rule applies to must be unchanged. */
static void check_rows(const float *before, const float *x, const uint64_t *ids, const uint8_t *ph,
                       size_t n, int line) {
  double want[64], scale;
  for (size_t t = 0; t < n; t++) {
    int applied = reference_row(before + t * D, ids[t], ph[t], want, 1);
    double err = row_error(want, x + t * D, &scale);
    CHECK(err <= TOL_F32, "hook at line %d, token %zu (request %llu): relative error %.3g > %g",
          line, t, (unsigned long long)ids[t], err, TOL_F32);
    if (!applied)
      CHECK(memcmp(before + t * D, x + t * D, D * sizeof(float)) == 0,
            "hook at line %d: token %zu has no rule but was changed", line, t);
  }
}

/* Runs the hook on f32 rows `x` (edited in place) and compares every row with the reference. */
static void hook_f32(tiller_step *step, const uint64_t *ids, const uint8_t *ph, size_t n, float *x,
                     int line, uint64_t *tokens_counter) {
  float before[MAX_TOKENS * 64];
  if (!step) return;
  memcpy(before, x, n * D * sizeof(float));
  if (!expect_at(line, "tiller_step_hook(f32)",
                 tiller_step_hook(step, HOOK, x, TILLER_F32, n, D), TILLER_OK))
    return;
  CHECK(last_error()[0] == 0, "last error after a success is \"%s\"", last_error());
  if (tokens_counter) *tokens_counter += n;
  check_rows(before, x, ids, ph, n, line);
}

/* The same through a 16-bit buffer (TILLER_F16 or TILLER_BF16). */
static void hook_16(tiller_step *step, const uint64_t *ids, const uint8_t *ph, size_t n,
                    const float *x, uint32_t dtype, int line, uint64_t *tokens_counter) {
  uint16_t buf[MAX_TOKENS * 64], before[MAX_TOKENS * 64];
  float in[64], out[64];
  double want[64], scale;
  double tol = dtype == TILLER_F16 ? TOL_F16 : TOL_BF16;
  const char *name = dtype == TILLER_F16 ? "f16" : "bf16";
  if (!step) return;
  for (size_t i = 0; i < n * D; i++)
    buf[i] = dtype == TILLER_F16 ? float_to_half(x[i]) : float_to_bf16(x[i]);
  memcpy(before, buf, n * D * sizeof(uint16_t));
  if (!expect_at(line, "tiller_step_hook(16-bit)", tiller_step_hook(step, HOOK, buf, dtype, n, D),
                 TILLER_OK))
    return;
  if (tokens_counter) *tokens_counter += n;
  for (size_t t = 0; t < n; t++) {
    for (size_t i = 0; i < D; i++) {
      uint16_t a = before[t * D + i], b = buf[t * D + i];
      in[i] = dtype == TILLER_F16 ? half_to_float(a) : bf16_to_float(a);
      out[i] = dtype == TILLER_F16 ? half_to_float(b) : bf16_to_float(b);
    }
    int applied = reference_row(in, ids[t], ph[t], want, 1);
    double err = row_error(want, out, &scale);
    CHECK(err <= tol, "%s hook at line %d, token %zu (request %llu): relative error %.3g > %g",
          name, line, t, (unsigned long long)ids[t], err, tol);
    if (!applied)
      CHECK(memcmp(before + t * D, buf + t * D, D * sizeof(uint16_t)) == 0,
            "%s hook at line %d: token %zu has no rule but was changed", name, line, t);
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Output buffers.                                                                                */

/* Calls `get` the way a C host should: ask the size, allocate exactly that, fetch. */
typedef tiller_status (*getter)(const void *ctx, char *buf, size_t len, size_t *needed);

static char *fetch(getter get, const void *ctx, int line) {
  size_t needed = 0;
  tiller_status s = get(ctx, NULL, 0, &needed);
  if (!expect_at(line, "size query", s, TILLER_BUFFER_TOO_SMALL)) return NULL;
  CHECK(needed > 0, "size query at line %d reported 0 bytes", line);
  char *buf = malloc(needed); /* exactly: Valgrind sees any write past it */
  if (!buf) abort();
  size_t again = 0;
  if (!expect_at(line, "fetch", get(ctx, buf, needed, &again), TILLER_OK)) {
    free(buf);
    return NULL;
  }
  CHECK(again == needed, "line %d: needed %zu, then %zu", line, needed, again);
  CHECK(strlen(buf) + 1 == needed, "line %d: %zu bytes written for %zu needed", line,
        strlen(buf) + 1, needed);
  return buf;
}

static tiller_status get_build_info(const void *ctx, char *buf, size_t len, size_t *needed) {
  (void)ctx;
  return tiller_build_info(buf, len, needed);
}

static tiller_status get_metrics(const void *ctx, char *buf, size_t len, size_t *needed) {
  return tiller_metrics_text(ctx, buf, len, needed);
}

static const tiller_runtime *summary_rt;
static tiller_status get_summary(const void *ctx, char *buf, size_t len, size_t *needed) {
  return tiller_request_summary(summary_rt, *(const uint64_t *)ctx, buf, len, needed);
}

/* The value of `"key":<n>` inside the summary's "steering" object (0 when absent, -1 on error). */
static long long steering_count(const char *json, const char *rule) {
  const char *s = strstr(json, "\"steering\":{");
  if (!s) return -1;
  const char *end = strchr(s, '}');
  char key[128];
  snprintf(key, sizeof key, "\"%s\":", rule);
  const char *k = strstr(s, key);
  if (!k || k > end) return 0;
  return strtoll(k + strlen(key), NULL, 10);
}

/* The value of the sample `series` (the whole `name{labels}`) in the metrics text, or -1. */
static double metric(const char *text, const char *series) {
  size_t n = strlen(series);
  for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
    if (strncmp(line, series, n) == 0 && line[n] == ' ') return strtod(line + n + 1, NULL);
  }
  return -1;
}

static void check_summary(const tiller_runtime *rt, uint64_t id, int line) {
  struct rule rules[2];
  size_t n = rules_of(id, rules);
  summary_rt = rt;
  char *json = fetch(get_summary, &id, line);
  if (!json) return;
  char want[64];
  snprintf(want, sizeof want, "\"request\":%llu", (unsigned long long)id);
  CHECK(strstr(json, want) != NULL, "summary of %llu lacks %s: %s", (unsigned long long)id, want,
        json);
  for (size_t r = 0; r < n; r++) {
    long long got = steering_count(json, rules[r].name);
    CHECK(got == (long long)edits[id][r],
          "summary of request %llu (line %d): rule %s edited %lld tokens, expected %llu: %s",
          (unsigned long long)id, line, rules[r].name, got, (unsigned long long)edits[id][r], json);
  }
  free(json);
}

/* ---------------------------------------------------------------------------------------------- */

static void test_version_and_errors(void) {
  const char *v = tiller_version();
  CHECK(v != NULL && v[0] >= '0' && v[0] <= '9', "tiller_version() = \"%s\"", v ? v : "(null)");
  char *info = fetch(get_build_info, NULL, __LINE__);
  if (info) {
    char want[128];
    snprintf(want, sizeof want, "\"version\":\"%s\"", v);
    CHECK(strstr(info, want) != NULL, "build info %s lacks %s", info, want);
    CHECK(strstr(info, "\"onnxruntime\":\"1.") != NULL, "build info %s lacks onnxruntime", info);
    CHECK(strstr(info, "\"cuda\":false") != NULL, "build info %s lacks cuda", info);

    /* One byte short: TOO_SMALL, the size again, and the buffer untouched. */
    size_t n = strlen(info) + 1, needed = 0;
    char *small = malloc(n - 1);
    if (!small) abort();
    memset(small, 'X', n - 1);
    EXPECT(tiller_build_info(small, n - 1, &needed), TILLER_BUFFER_TOO_SMALL);
    CHECK(needed == n, "build info: needed %zu, expected %zu", needed, n);
    CHECK(small[0] == 'X' && small[n - 2] == 'X', "a too-small buffer was written to");
    free(small);
    /* `needed` may be NULL. */
    EXPECT(tiller_build_info(NULL, 0, NULL), TILLER_BUFFER_TOO_SMALL);
    char big[1024];
    EXPECT(tiller_build_info(big, sizeof big, NULL), TILLER_OK);
    CHECK(strcmp(big, info) == 0, "build info differs between calls");
    free(info);
  }

  /* last_error: empty after a success; the message after a failure; the size when too small;
   * reading it does not change it. */
  EXPECT(tiller_build_info(NULL, 0, NULL), TILLER_BUFFER_TOO_SMALL);
  char big[64];
  EXPECT(tiller_build_info(big, 0, NULL), TILLER_BUFFER_TOO_SMALL);
  char info2[1024];
  EXPECT(tiller_build_info(info2, sizeof info2, NULL), TILLER_OK);
  CHECK(last_error()[0] == 0, "last error after a success: \"%s\"", last_error());

  tiller_runtime *rt = NULL;
  EXPECT(tiller_runtime_new_from_file("/nonexistent/tiller.toml", &rt), TILLER_IO);
  CHECK(rt == NULL, "a failed tiller_runtime_new_from_file wrote a handle");
  char msg[4096];
  size_t needed = 0;
  EXPECT(tiller_last_error(msg, sizeof msg, &needed), TILLER_OK);
  CHECK(strstr(msg, "/nonexistent/tiller.toml") != NULL, "the error does not name the file: %s",
        msg);
  CHECK(needed == strlen(msg) + 1, "last_error: needed %zu for a %zu-byte message", needed,
        strlen(msg));
  size_t full = strlen(msg) + 1;
  char tiny[4] = {'X', 'X', 'X', 'X'};
  size_t needed_small = 0;
  EXPECT(tiller_last_error(tiny, sizeof tiny, &needed_small), TILLER_BUFFER_TOO_SMALL);
  CHECK(needed_small == full, "last_error with 4 bytes: needed %zu, expected %zu", needed_small,
        full);
  CHECK(tiny[0] == 'X', "last_error wrote into a too-small buffer");
  size_t needed_null = 0;
  EXPECT(tiller_last_error(NULL, 0, &needed_null), TILLER_BUFFER_TOO_SMALL);
  CHECK(needed_null == full, "last_error(NULL): needed %zu, expected %zu", needed_null, full);
  /* The size query must not replace the message it measures: a host asks the size, allocates
   * it and reads the message. */
  char *exact = malloc(full);
  if (!exact) abort();
  EXPECT(tiller_last_error(exact, full, NULL), TILLER_OK);
  CHECK(strncmp(exact, msg, full) == 0,
        "after a too-small tiller_last_error the message is \"%.*s\", not the original \"%s\"",
        (int)full, exact, msg);
  free(exact);
  EXPECT(tiller_last_error(NULL, 0, NULL), TILLER_BUFFER_TOO_SMALL);
}

static void test_null_arguments(const tiller_runtime *rt) {
  tiller_runtime *out = NULL;
  tiller_step *step = NULL;
  uint64_t ids[1] = {1};
  uint8_t ph[1] = {TILLER_PROMPT};
  float x[64] = {0};
  char buf[64];
  size_t needed;

  EXPECT(tiller_runtime_new_from_file(NULL, &out), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`path`");
  EXPECT(tiller_runtime_new_from_file("tiller.toml", NULL), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`out`");
  EXPECT(tiller_runtime_new_from_toml(NULL, dir, &out), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`toml`");
  EXPECT(tiller_runtime_new_from_toml("", dir, NULL), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`out`");
  CHECK(out == NULL, "a failed constructor wrote a handle");
  EXPECT(tiller_runtime_reload(NULL, NULL), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`rt`");
  EXPECT(tiller_request_begin(NULL, 1, NULL, NULL), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_request_summary(NULL, 1, buf, sizeof buf, &needed), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_request_end(NULL, 1, buf, sizeof buf, &needed), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_step_open(NULL, ids, ph, 1, &step), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_step_open(rt, NULL, ph, 1, &step), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`request_ids`");
  EXPECT(tiller_step_open(rt, ids, NULL, 1, &step), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`phases`");
  EXPECT(tiller_step_open(rt, ids, ph, 1, NULL), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`out`");
  CHECK(step == NULL, "a failed tiller_step_open wrote a step");
  EXPECT(tiller_step_hook(NULL, HOOK, x, TILLER_F32, 1, D), TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`step`");
  EXPECT(tiller_step_hook_cuda(NULL, HOOK, x, TILLER_F32, 1, D, NULL), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_step_close(NULL, NULL, 0, NULL), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_metrics_text(NULL, buf, sizeof buf, &needed), TILLER_NULL_ARGUMENT);
  EXPECT(tiller_build_info(NULL, 0, NULL), TILLER_BUFFER_TOO_SMALL); /* NULL buf: a size query */
  tiller_runtime_free(NULL);
  tiller_step_free(NULL);

  /* Arguments of a live step. */
  tiller_step *s = open_step(rt, ids, ph, 1, __LINE__);
  if (s) {
    EXPECT(tiller_step_hook(s, NULL, x, TILLER_F32, 1, D), TILLER_NULL_ARGUMENT);
    EXPECT_ERROR_HAS("`hook`");
    EXPECT(tiller_step_hook(s, HOOK, NULL, TILLER_F32, 1, D), TILLER_NULL_ARGUMENT);
    EXPECT_ERROR_HAS("`data`");
    EXPECT(tiller_step_hook_cuda(s, NULL, x, TILLER_F32, 1, D, NULL), TILLER_NULL_ARGUMENT);
    EXPECT(tiller_step_hook_cuda(s, HOOK, NULL, TILLER_F32, 1, D, NULL), TILLER_NULL_ARGUMENT);
    /* Optional outputs of close may be NULL. */
    EXPECT(tiller_step_close(s, NULL, 5, NULL), TILLER_OK);
  }
}

/* Hook argument errors on one step of request 1 (2 tokens); none may touch the data. */
static void test_hook_errors(const tiller_runtime *rt) {
  uint64_t ids[2] = {1, 1};
  uint8_t ph[2] = {TILLER_PROMPT, TILLER_PROMPT};
  float x[2 * 64], copy[2 * 64];
  fill(x, 2, ids, 0);
  memcpy(copy, x, 2 * D * sizeof(float));
  tiller_step *s = open_step(rt, ids, ph, 2, __LINE__);
  if (!s) return;
  EXPECT(tiller_step_hook(s, HOOK, x, TILLER_F32, 1, D), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS(HOOK);
  EXPECT(tiller_step_hook(s, HOOK, x, TILLER_F32, 3, D), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook(s, HOOK, x, TILLER_F32, 2, D - 1), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook(s, HOOK, x, TILLER_F32, SIZE_MAX, 2), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("overflows");
  EXPECT(tiller_step_hook(s, HOOK, x, 3, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("dtype 3");
  EXPECT(tiller_step_hook(s, HOOK, x, 0xffffffffu, 2, D), TILLER_INVALID_ARGUMENT);
  /* Misaligned: f32 needs 4 bytes, f16/bf16 2. The bytes are never read. */
  EXPECT(tiller_step_hook(s, HOOK, (char *)x + 1, TILLER_F32, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("aligned");
  EXPECT(tiller_step_hook(s, HOOK, (char *)x + 2, TILLER_F32, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook(s, HOOK, (char *)x + 1, TILLER_F16, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook(s, HOOK, (char *)x + 1, TILLER_BF16, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook(s, "layer.1", x, TILLER_F32, 2, D), TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("layer.1");
  EXPECT(tiller_step_hook(s, "\xff\xfe", x, TILLER_F32, 2, D), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_hook_cuda(s, HOOK, x, TILLER_F32, 2, D, NULL), TILLER_UNSUPPORTED);
  EXPECT_ERROR_HAS("CUDA");
  CHECK(memcmp(x, copy, 2 * D * sizeof(float)) == 0, "a failed hook call changed the activations");
  /* The step still works after all that. */
  hook_f32(s, ids, ph, 2, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);

  /* The header says n_tokens must be the step's token count and width the hook's: 4 × D/2 holds
   * as many values as 2 × D but is not this step's shape. Request 4 has no rules, so that a call
   * wrongly accepted changes no tally but the token count. */
  uint64_t ids4[2] = {4, 4};
  fill(x, 2, ids4, 0);
  s = open_step(rt, ids4, ph, 2, __LINE__);
  if (!s) return;
  tiller_status st = tiller_step_hook(s, HOOK, x, TILLER_F32, 4, D / 2);
  expect_at(__LINE__, "tiller_step_hook(s, HOOK, x, TILLER_F32, 4, D / 2)", st,
            TILLER_INVALID_ARGUMENT);
  if (st == TILLER_OK) {
    double want[64];
    hook_tokens += 2;
    for (size_t t = 0; t < 2; t++) reference_row(x + t * D, 4, ph[t], want, 1);
  }
  close_step(s, __LINE__);
}

static void test_requests(const tiller_runtime *rt) {
  EXPECT(tiller_request_begin(rt, 1, "clamp", NULL), TILLER_OK);
  CHECK(last_error()[0] == 0, "last error after a success: \"%s\"", last_error());
  EXPECT(tiller_request_begin(rt, 2, "boost", ""), TILLER_OK);
  EXPECT(tiller_request_begin(rt, 3, "clamp", OVERRIDES), TILLER_OK);
  EXPECT(tiller_request_begin(rt, 4, NULL, NULL), TILLER_OK);

  EXPECT(tiller_request_begin(rt, 5, "no-such-profile", NULL), TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("no-such-profile");
  EXPECT(tiller_request_begin(rt, 5, NULL, "{\"steer\": ["), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("overrides");
  EXPECT(tiller_request_begin(rt, 5, NULL, "{\"stear\": []}"), TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_request_begin(rt, 5, "\xff", NULL), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("UTF-8");
  EXPECT(tiller_request_begin(rt, 5, NULL, "{\"steer\": [{\"op\": \"ablate\", \"dictionary\": "
                                           "\"missing\", \"feature\": 1}]}"),
         TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("missing");
  /* A duplicate id is refused and leaves the running request as it was. */
  tiller_status dup = tiller_request_begin(rt, 1, "boost", NULL);
  CHECK(dup != TILLER_OK, "a second request 1 was accepted");
  EXPECT_ERROR_HAS("already running");
  /* None of the refused requests exists. */
  size_t needed;
  char buf[16];
  EXPECT(tiller_request_summary(rt, 5, buf, sizeof buf, &needed), TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("5");

  /* Step open errors. */
  tiller_step *s = NULL;
  uint64_t ids[3] = {1, 2, 99};
  uint8_t ph[3] = {TILLER_PROMPT, TILLER_GENERATED, TILLER_PROMPT};
  EXPECT(tiller_step_open(rt, ids, ph, 3, &s), TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("99");
  CHECK(s == NULL, "a failed tiller_step_open wrote a step");
  uint8_t bad_phase[2] = {TILLER_PROMPT, 2};
  EXPECT(tiller_step_open(rt, ids, bad_phase, 2, &s), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("phases[1] = 2");
  /* A count no array can hold is refused before any slice is made over the arrays. */
  EXPECT(tiller_step_open(rt, ids, ph, SIZE_MAX, &s), TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("n_tokens");
  EXPECT(tiller_step_run(rt, ids, ph, SIZE_MAX / 4, HOOK, ids, TILLER_F32, 0, NULL, 0, NULL),
         TILLER_INVALID_ARGUMENT);
  /* An empty step: NULL arrays are fine with 0 tokens. */
  s = open_step(rt, NULL, NULL, 0, __LINE__);
  if (s) {
    float dummy = 0;
    EXPECT(tiller_step_hook(s, HOOK, &dummy, TILLER_F32, 0, D), TILLER_OK);
    close_step(s, __LINE__);
  }
}

static void test_steering(const tiller_runtime *rt) {
  float x[MAX_TOKENS * 64];
  {
    /* Prompts of four requests in one batch: two profiles, no profile, overrides. */
    uint64_t ids[8] = {1, 1, 2, 2, 3, 3, 4, 4};
    uint8_t ph[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    fill(x, 8, ids, 0);
    tiller_step *s = open_step(rt, ids, ph, 8, __LINE__);
    hook_f32(s, ids, ph, 8, x, __LINE__, &hook_tokens);
    close_step(s, __LINE__);
  }
  {
    /* Generated tokens: the boost rule applies now; only requests 1, 2 and 4 (sliced encoder). */
    uint64_t ids[4] = {2, 1, 4, 2};
    uint8_t ph[4] = {1, 1, 1, 0};
    fill(x, 4, ids, 0);
    tiller_step *s = open_step(rt, ids, ph, 4, __LINE__);
    hook_f32(s, ids, ph, 4, x, __LINE__, &hook_tokens);
    close_step(s, __LINE__);
  }
  {
    /* f16 and bf16 host memory, one step each. */
    uint64_t ids[4] = {1, 2, 3, 4};
    uint8_t ph[4] = {1, 1, 1, 1};
    fill(x, 4, ids, 0);
    tiller_step *s = open_step(rt, ids, ph, 4, __LINE__);
    hook_16(s, ids, ph, 4, x, TILLER_F16, __LINE__, &hook_tokens);
    close_step(s, __LINE__);
    fill(x, 4, ids, 0);
    s = open_step(rt, ids, ph, 4, __LINE__);
    hook_16(s, ids, ph, 4, x, TILLER_BF16, __LINE__, &hook_tokens);
    close_step(s, __LINE__);
  }
  {
    /* The monitor stops requests 2 and 4; the caller's array holds one id. */
    uint64_t ids[4] = {1, 2, 4, 4};
    uint8_t ph[4] = {1, 1, 1, 1};
    fill(x, 4, ids, 2);
    for (size_t i = 0; i < D; i++) x[3 * D + i] = x[1 * D + i]; /* request 4's second token */
    tiller_step *s = open_step(rt, ids, ph, 4, __LINE__);
    hook_f32(s, ids, ph, 4, x, __LINE__, &hook_tokens);
    CHECK(n_want_stop == 2, "the crafted tokens should stop 2 requests, the reference says %zu",
          n_want_stop);
    if (s) {
      uint64_t stop[2] = {0, 777};
      size_t n_stop = 0;
      EXPECT(tiller_step_close(s, stop, 1, &n_stop), TILLER_OK);
      CHECK(n_stop == 2, "tiller_step_close: %zu requests to stop, expected 2", n_stop);
      CHECK(stop[0] == 2 || stop[0] == 4, "tiller_step_close: stop[0] = %llu",
            (unsigned long long)stop[0]);
      CHECK(stop[1] == 777, "tiller_step_close wrote past stop_cap");
    }
  }
  /* A step freed without closing (its events are dropped). */
  {
    uint64_t ids[1] = {1};
    uint8_t ph[1] = {1};
    fill(x, 1, ids, 0);
    tiller_step *s = open_step(rt, ids, ph, 1, __LINE__);
    hook_f32(s, ids, ph, 1, x, __LINE__, &hook_tokens);
    tiller_step_free(s);
  }
}

/* tiller_step_run: open, hook and close in one call, checked as hook_f32 and close_step check
 * the three calls. */
static void run_f32(const tiller_runtime *rt, const uint64_t *ids, const uint8_t *ph, size_t n,
                    float *x, int line) {
  float before[MAX_TOKENS * 64];
  uint64_t stop[MAX_TOKENS];
  size_t n_stop = 12345;
  memcpy(before, x, n * D * sizeof(float));
  n_want_stop = 0;
  if (!expect_at(line, "tiller_step_run",
                 tiller_step_run(rt, ids, ph, n, HOOK, x, TILLER_F32, D, stop, MAX_TOKENS, &n_stop),
                 TILLER_OK))
    return;
  CHECK(last_error()[0] == 0, "last error after a success is \"%s\"", last_error());
  hook_tokens += n;
  check_rows(before, x, ids, ph, n, line);
  check_stops(stop, n_stop, line);
}

static void test_step_run(const tiller_runtime *rt) {
  float x[MAX_TOKENS * 64], copy[MAX_TOKENS * 64];
  {
    /* Prompts and generated tokens of four requests, as one step of the three calls. */
    uint64_t ids[6] = {1, 2, 3, 4, 1, 2};
    uint8_t ph[6] = {0, 0, 1, 1, 1, 1};
    fill(x, 6, ids, 0);
    run_f32(rt, ids, ph, 6, x, __LINE__);
  }
  {
    /* The monitor stops requests 2 and 4; the caller's array holds one id. */
    uint64_t ids[3] = {2, 4, 1};
    uint8_t ph[3] = {1, 1, 1};
    fill(x, 3, ids, 2);
    for (size_t i = 0; i < D; i++) x[1 * D + i] = x[0 * D + i];
    uint64_t stop[2] = {0, 777};
    size_t n_stop = 0;
    float before[3 * 64];
    memcpy(before, x, 3 * D * sizeof(float));
    n_want_stop = 0;
    EXPECT(tiller_step_run(rt, ids, ph, 3, HOOK, x, TILLER_F32, D, stop, 1, &n_stop), TILLER_OK);
    hook_tokens += 3;
    check_rows(before, x, ids, ph, 3, __LINE__);
    CHECK(n_want_stop == 2, "the crafted tokens should stop 2 requests, the reference says %zu",
          n_want_stop);
    CHECK(n_stop == 2, "tiller_step_run: %zu requests to stop, expected 2", n_stop);
    CHECK(stop[0] == 2 || stop[0] == 4, "tiller_step_run: stop[0] = %llu",
          (unsigned long long)stop[0]);
    CHECK(stop[1] == 777, "tiller_step_run wrote past stop_cap");
  }
  /* Zero tokens with NULL arrays, and NULL stop outputs. */
  {
    float dummy = 0;
    size_t n_stop = 12345;
    EXPECT(tiller_step_run(rt, NULL, NULL, 0, HOOK, &dummy, TILLER_F32, D, NULL, 0, &n_stop),
           TILLER_OK);
    CHECK(n_stop == 0, "an empty step reported %zu requests to stop", n_stop);
  }
  /* Every refused call leaves the activations and the outputs alone. */
  uint64_t ids[2] = {1, 3};
  uint8_t ph[2] = {1, 1};
  fill(x, 2, ids, 0);
  memcpy(copy, x, 2 * D * sizeof(float));
  uint64_t stop[2] = {777, 777};
  size_t n_stop = 12345;
  EXPECT(tiller_step_run(NULL, ids, ph, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`rt`");
  EXPECT(tiller_step_run(rt, NULL, ph, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`request_ids`");
  EXPECT(tiller_step_run(rt, ids, NULL, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`phases`");
  EXPECT(tiller_step_run(rt, ids, ph, 2, NULL, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`hook`");
  EXPECT(tiller_step_run(rt, ids, ph, 2, HOOK, NULL, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NULL_ARGUMENT);
  EXPECT_ERROR_HAS("`data`");
  uint8_t bad_phase[2] = {1, 7};
  EXPECT(tiller_step_run(rt, ids, bad_phase, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("phases[1] = 7");
  uint64_t unknown[2] = {1, 99};
  EXPECT(tiller_step_run(rt, unknown, ph, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("99");
  EXPECT(tiller_step_run(rt, ids, ph, 2, "layer.1", x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_NOT_FOUND);
  EXPECT_ERROR_HAS("layer.1");
  EXPECT(tiller_step_run(rt, ids, ph, 2, HOOK, x, TILLER_F32, D - 1, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_run(rt, ids, ph, SIZE_MAX, HOOK, x, TILLER_F32, 2, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  EXPECT(tiller_step_run(rt, ids, ph, 2, HOOK, x, 3, D, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("dtype 3");
  EXPECT(tiller_step_run(rt, ids, ph, 2, HOOK, (char *)x + 1, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  EXPECT_ERROR_HAS("aligned");
  EXPECT(tiller_step_run(rt, ids, ph, 2, "\xff\xfe", x, TILLER_F32, D, stop, 2, &n_stop),
         TILLER_INVALID_ARGUMENT);
  setenv("TILLER_TEST_PANIC_AT_HOOK", HOOK, 1);
  EXPECT(tiller_step_run(rt, ids, ph, 2, HOOK, x, TILLER_F32, D, stop, 2, &n_stop), TILLER_PANIC);
  EXPECT_ERROR_HAS("injected panic");
  unsetenv("TILLER_TEST_PANIC_AT_HOOK");
  CHECK(memcmp(x, copy, 2 * D * sizeof(float)) == 0, "a refused tiller_step_run changed the data");
  CHECK(n_stop == 12345 && stop[0] == 777 && stop[1] == 777,
        "a refused tiller_step_run wrote its outputs");
  /* And the same tokens then run. */
  run_f32(rt, ids, ph, 2, x, __LINE__);
}

static void test_panic(const tiller_runtime *rt) {
  uint64_t ids[2] = {1, 4};
  uint8_t ph[2] = {1, 1};
  float x[2 * 64], copy[2 * 64];
  fill(x, 2, ids, 0);
  memcpy(copy, x, 2 * D * sizeof(float));
  tiller_step *s = open_step(rt, ids, ph, 2, __LINE__);
  if (!s) return;
  setenv("TILLER_TEST_PANIC_AT_HOOK", HOOK, 1);
  EXPECT(tiller_step_hook(s, HOOK, x, TILLER_F32, 2, D), TILLER_PANIC);
  EXPECT_ERROR_HAS("injected panic");
  unsetenv("TILLER_TEST_PANIC_AT_HOOK");
  CHECK(memcmp(x, copy, 2 * D * sizeof(float)) == 0, "the panicking hook changed the activations");
  /* The process, the runtime and even this step go on working. */
  hook_f32(s, ids, ph, 2, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);
  fill(x, 2, ids, 0);
  s = open_step(rt, ids, ph, 2, __LINE__);
  hook_f32(s, ids, ph, 2, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);
}

static void test_reload(tiller_runtime *rt) {
  char *reload = path_in("reload.toml");
  char *bad = path_in("bad.toml");
  uint64_t ids[3] = {1, 3, 2};
  uint8_t ph[3] = {1, 1, 1};
  float x[3 * 64];

  EXPECT(tiller_runtime_reload(rt, reload), TILLER_OK);
  clamp_value = 1.0;
  fill(x, 3, ids, 0);
  tiller_step *s = open_step(rt, ids, ph, 3, __LINE__);
  hook_f32(s, ids, ph, 3, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);

  /* A bad file: refused with its name, line and key; the running state is untouched. */
  EXPECT(tiller_runtime_reload(rt, bad), TILLER_CONFIG);
  EXPECT_ERROR_HAS("bad.toml");
  EXPECT_ERROR_HAS("missing");
  EXPECT(tiller_runtime_reload(rt, "/nonexistent/tiller.toml"), TILLER_IO);
  EXPECT(tiller_runtime_reload(rt, "\xff"), TILLER_INVALID_ARGUMENT);
  fill(x, 3, ids, 0);
  s = open_step(rt, ids, ph, 3, __LINE__);
  hook_f32(s, ids, ph, 3, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);

  /* NULL: the file the runtime was last built from (reload.toml). */
  EXPECT(tiller_runtime_reload(rt, NULL), TILLER_OK);
  fill(x, 3, ids, 0);
  s = open_step(rt, ids, ph, 3, __LINE__);
  hook_f32(s, ids, ph, 3, x, __LINE__, &hook_tokens);
  close_step(s, __LINE__);
  free(reload);
  free(bad);
}

static void test_end(const tiller_runtime *rt) {
  for (uint64_t id = 1; id <= 4; id++) check_summary(rt, id, __LINE__);

  summary_rt = rt;
  uint64_t two = 2;
  char *s2 = fetch(get_summary, &two, __LINE__);
  if (s2) {
    CHECK(strstr(s2, "\"stopped\":true") != NULL, "request 2 was stopped: %s", s2);
    CHECK(strstr(s2, "\"profile\":\"boost\"") != NULL, "request 2 kept its profile: %s", s2);
    free(s2);
  }

  /* End with a buffer one byte short: refused, and the request lives on. */
  uint64_t one = 1;
  char *s1 = fetch(get_summary, &one, __LINE__);
  if (s1) {
    size_t n = strlen(s1) + 1, needed = 0;
    char *small = malloc(n - 1);
    if (!small) abort();
    EXPECT(tiller_request_end(rt, 1, small, n - 1, &needed), TILLER_BUFFER_TOO_SMALL);
    CHECK(needed == n, "tiller_request_end: needed %zu, expected %zu", needed, n);
    free(small);
    EXPECT(tiller_request_summary(rt, 1, NULL, 0, &needed), TILLER_BUFFER_TOO_SMALL);
    char *exact = malloc(n);
    if (!exact) abort();
    EXPECT(tiller_request_end(rt, 1, exact, n, &needed), TILLER_OK);
    CHECK(strcmp(exact, s1) == 0, "the summary at the end differs:\n%s\n%s", exact, s1);
    free(exact);
    free(s1);
  }
  /* Used after its end. */
  char buf[4096];
  size_t needed;
  EXPECT(tiller_request_summary(rt, 1, buf, sizeof buf, &needed), TILLER_NOT_FOUND);
  EXPECT(tiller_request_end(rt, 1, buf, sizeof buf, &needed), TILLER_NOT_FOUND);
  EXPECT(tiller_request_end(rt, 1, NULL, 0, NULL), TILLER_NOT_FOUND);
  uint64_t ids[1] = {1};
  uint8_t ph[1] = {1};
  tiller_step *s = NULL;
  EXPECT(tiller_step_open(rt, ids, ph, 1, &s), TILLER_NOT_FOUND);

  /* Ended without a summary. */
  EXPECT(tiller_request_end(rt, 4, NULL, 0, NULL), TILLER_OK);
  EXPECT(tiller_request_summary(rt, 4, buf, sizeof buf, &needed), TILLER_NOT_FOUND);
  /* Ended with the summary in a large buffer. */
  EXPECT(tiller_request_end(rt, 3, buf, sizeof buf, &needed), TILLER_OK);
  CHECK(strstr(buf, "\"ov-ablate\":") != NULL, "request 3's summary lacks its override: %s", buf);
  CHECK(needed == strlen(buf) + 1, "tiller_request_end: needed %zu for %zu bytes", needed,
        strlen(buf));
  EXPECT(tiller_request_end(rt, 2, buf, sizeof buf, NULL), TILLER_OK);
  /* An id can be used again once ended. */
  EXPECT(tiller_request_begin(rt, 1, NULL, NULL), TILLER_OK);
  EXPECT(tiller_request_end(rt, 1, NULL, 0, NULL), TILLER_OK);
}

static void test_metrics(const tiller_runtime *rt) {
  char *text = fetch(get_metrics, rt, __LINE__);
  if (!text) return;
  double tokens = metric(text, "tiller_tokens_total{hook=\"" HOOK "\"}");
  CHECK(tokens == (double)hook_tokens, "tiller_tokens_total = %g, expected %llu", tokens,
        (unsigned long long)hook_tokens);
  double clamp = metric(text, "tiller_steering_tokens_total{rule=\"clamp-3\"}");
  CHECK(clamp == (double)clamp_edits_total, "steering clamp-3 = %g, expected %llu", clamp,
        (unsigned long long)clamp_edits_total);
  double over = metric(text, "tiller_steering_tokens_total{rule=\"request_override\"}");
  CHECK(over == (double)override_edits_total, "steering request_override = %g, expected %llu",
        over, (unsigned long long)override_edits_total);
  CHECK(strstr(text, "ov-ablate") == NULL, "a per-request rule name became a label");
  double ok = metric(text, "tiller_config_reloads_total{result=\"accepted\"}");
  double rejected = metric(text, "tiller_config_reloads_total{result=\"rejected\"}");
  CHECK(ok == 2, "accepted reloads: %g, expected 2", ok);
  CHECK(rejected == 2, "rejected reloads: %g, expected 2", rejected);
  CHECK(strstr(text, "tiller_build_info") != NULL, "no tiller_build_info in the metrics");
  free(text);
}

/* A runtime from a TOML string; the step that outlives its runtime handle. */
static void test_runtime_from_toml(void) {
  char *toml = read_file("tiller.toml", NULL);
  tiller_runtime *rt = NULL;

  EXPECT(tiller_runtime_new_from_toml("[runtime\nthreads = 1\n", dir, &rt), TILLER_CONFIG);
  EXPECT_ERROR_HAS("<config>:1:"); /* the in-memory config's name in errors, and the line */
  CHECK(rt == NULL, "a failed constructor wrote a handle");
  /* Without base_dir, dict.onnx is looked up in the current directory: not there. */
  tiller_status s = tiller_runtime_new_from_toml(toml, NULL, &rt);
  CHECK(s != TILLER_OK && rt == NULL, "without base_dir: %s", status_name(s));
  EXPECT_ERROR_HAS("dict.onnx");
  EXPECT(tiller_runtime_new_from_toml("\xff", dir, &rt), TILLER_INVALID_ARGUMENT);

  if (!EXPECT(tiller_runtime_new_from_toml(toml, dir, &rt), TILLER_OK)) {
    free(toml);
    return;
  }
  clamp_value = 2.5;
  EXPECT(tiller_request_begin(rt, 10, "clamp", NULL), TILLER_OK);
  uint64_t ids[2] = {10, 10};
  uint8_t ph[2] = {0, 1};
  float x[2 * 64];
  fill(x, 2, ids, 0);
  tiller_step *step = open_step(rt, ids, ph, 2, __LINE__);
  hook_f32(step, ids, ph, 2, x, __LINE__, NULL);
  close_step(step, __LINE__);
  check_summary(rt, 10, __LINE__);

  /* A runtime from a string has no file to reload from: an error, and it keeps serving. */
  s = tiller_runtime_reload(rt, NULL);
  CHECK(s != TILLER_OK, "reloading a runtime built from a string without a path: %s",
        status_name(s));
  char *reload = path_in("reload.toml");
  EXPECT(tiller_runtime_reload(rt, reload), TILLER_OK);
  free(reload);
  clamp_value = 1.0;

  /* The step keeps the runtime alive after tiller_runtime_free. */
  fill(x, 2, ids, 0);
  step = open_step(rt, ids, ph, 2, __LINE__);
  tiller_runtime_free(rt);
  hook_f32(step, ids, ph, 2, x, __LINE__, NULL);
  close_step(step, __LINE__);
  free(toml);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: abi_test <fixtures folder>\n");
    return 2;
  }
  dir = argv[1];
  load_weights();

  test_version_and_errors();

  char *config = path_in("tiller.toml");
  tiller_runtime *rt = NULL;
  if (!EXPECT(tiller_runtime_new_from_file(config, &rt), TILLER_OK) || !rt) {
    fprintf(stderr, "abi_test: no runtime, stopping\n");
    return 1;
  }
  free(config);
  CHECK(last_error()[0] == 0, "last error after a success: \"%s\"", last_error());

  test_requests(rt);
  test_null_arguments(rt);
  test_hook_errors(rt);
  test_steering(rt);
  test_step_run(rt);
  test_panic(rt);
  test_reload(rt);
  test_end(rt);
  test_metrics(rt);
  tiller_runtime_free(rt);

  test_runtime_from_toml();

  free(w_enc);
  free(b_enc);
  free(w_dec);
  free(b_dec);
  if (failures) {
    fprintf(stderr, "abi_test: %d of %d checks FAILED\n", failures, checks);
    return 1;
  }
  printf("abi_test: all %d checks passed\n", checks);
  return 0;
}
