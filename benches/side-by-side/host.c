/*
 * Tiller through its C ABI, for benches/compare: whole steps (tiller_step_open, tiller_step_hook,
 * tiller_step_close) at one batch size, each on a fresh copy of the same activations (copied
 * before each round, outside the timed part), exactly as the Rust and Python runs time them.
 *
 * Usage: host <tiller.toml> <x.f32> <width> <batch> <calls> <rounds>
 * x.f32 holds at least batch × width little-endian floats. Prints one JSON line: the median and
 * the minimum over rounds of the µs per call (after one warm-up round).
 */
#define _POSIX_C_SOURCE 200809L

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tiller.h"

static void check(tiller_status s, const char *what) {
  if (s == TILLER_OK) return;
  char msg[2048];
  tiller_last_error(msg, sizeof msg, NULL);
  fprintf(stderr, "host: %s: status %u: %s\n", what, (unsigned)s, msg);
  exit(1);
}

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e6 + (double)t.tv_nsec * 1e-3;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: host <tiller.toml> <x.f32> <width> <batch> <calls> <rounds>\n");
    return 2;
  }
  size_t width = (size_t)atol(argv[3]), batch = (size_t)atol(argv[4]);
  int calls = atoi(argv[5]), rounds = atoi(argv[6]);
  if (width == 0 || batch == 0 || calls < 1 || rounds < 1) {
    fprintf(stderr, "host: width, batch, calls and rounds must be positive\n");
    return 2;
  }
  size_t n = batch * width;
  float *x = malloc(n * sizeof *x);
  float *bufs = malloc((size_t)calls * n * sizeof *bufs);
  double *per = malloc((size_t)rounds * sizeof *per);
  uint64_t *ids = malloc(batch * sizeof *ids);
  uint8_t *phases = malloc(batch);
  if (!x || !bufs || !per || !ids || !phases) return 1;
  FILE *f = fopen(argv[2], "rb");
  if (!f || fread(x, sizeof *x, n, f) != n) {
    fprintf(stderr, "host: cannot read %zu floats from %s\n", n, argv[2]);
    return 1;
  }
  fclose(f);
  for (size_t i = 0; i < batch; i++) ids[i] = 1, phases[i] = TILLER_GENERATED;

  tiller_runtime *rt = NULL;
  check(tiller_runtime_new_from_file(argv[1], &rt), "runtime");
  check(tiller_request_begin(rt, 1, "p", NULL), "request");
  for (int r = -1; r < rounds; r++) {
    for (int c = 0; c < calls; c++) memcpy(bufs + (size_t)c * n, x, n * sizeof *x);
    double t0 = now_us();
    for (int c = 0; c < calls; c++) {
      tiller_step *step;
      check(tiller_step_open(rt, ids, phases, batch, &step), "open");
      check(tiller_step_hook(step, "h", bufs + (size_t)c * n, TILLER_F32, batch, width), "hook");
      check(tiller_step_close(step, NULL, 0, NULL), "close");
    }
    if (r >= 0) per[r] = (now_us() - t0) / calls;
  }
  qsort(per, (size_t)rounds, sizeof *per, cmp);
  printf("{\"kind\": \"time\", \"workload\": \"sliced_b%zu\", \"impl\": \"tiller_c\", \"batch\": %zu, "
         "\"us\": %.4f, \"min_us\": %.4f, \"rounds\": %d}\n",
         batch, batch, per[rounds / 2], per[0], rounds);
  check(tiller_request_end(rt, 1, NULL, 0, NULL), "end");
  tiller_runtime_free(rt);
  free(x);
  free(bufs);
  free(per);
  free(ids);
  free(phases);
  return 0;
}
