/*
 * The cost of one hook call at batch 1 through the C ABI: tiller_step_open, tiller_step_hook,
 * tiller_step_close, on the config of benches/benches/hook.rs (d_in 2304, a 16384-feature ReLU SAE,
 * 64 monitored features, 4 rules). The Rust twin is `overhead_rust_api` in
 * plugin-abi/c/tests/c_abi.rs; both time calls the way criterion's iter_batched_ref does in the
 * hook bench: each call gets a fresh copy of the same activations, made outside the timed loop.
 *
 * Usage: overhead <tiller.toml> [rounds]. Prints the median and the minimum over rounds of the
 * mean time per call, in ns, for the whole call, for the step alone (open + close, no hook) and
 * for a step of no tokens with one hook call (what the ABI adds, without the kernel's time).
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tiller.h"

#define D 2304
#define BATCH 1024 /* copies per timed loop (9.4 MB): inputs come from memory, as in criterion */

static void check(tiller_status s, const char *what) {
  if (s == TILLER_OK) return;
  char msg[2048];
  tiller_last_error(msg, sizeof msg, NULL);
  fprintf(stderr, "overhead: %s: status %u: %s\n", what, (unsigned)s, msg);
  exit(1);
}

static double now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void report(const char *what, double *per_call, int rounds) {
  qsort(per_call, (size_t)rounds, sizeof *per_call, cmp);
  printf("c_abi %-26s median %8.1f ns/call   min %8.1f ns/call   (%d rounds x %d calls)\n", what,
         per_call[rounds / 2], per_call[0], rounds, BATCH);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: overhead <tiller.toml> [rounds]\n");
    return 2;
  }
  int rounds = argc > 2 ? atoi(argv[2]) : 200;
  if (rounds < 1) rounds = 1;
  tiller_runtime *rt = NULL;
  check(tiller_runtime_new_from_file(argv[1], &rt), "runtime");
  check(tiller_request_begin(rt, 1, "p", NULL), "request");

  /* Random activations (xorshift + Box-Muller), then BATCH copies of them. */
  static float x[D];
  uint64_t s = 5;
  for (int i = 0; i < D; i++) {
    double u[2];
    for (int k = 0; k < 2; k++) {
      s ^= s << 13, s ^= s >> 7, s ^= s << 17;
      u[k] = ((double)(s >> 11) + 0.5) / 9007199254740992.0;
    }
    x[i] = (float)(sqrt(-2 * log(u[0])) * cos(6.283185307179586 * u[1]));
  }
  float *bufs = aligned_alloc(64, (size_t)BATCH * D * sizeof(float));
  double *full = malloc((size_t)rounds * sizeof(double));
  double *step_only = malloc((size_t)rounds * sizeof(double));
  double *empty = malloc((size_t)rounds * sizeof(double));
  if (!bufs || !full || !step_only || !empty) return 1;
  const uint64_t ids[1] = {1};
  const uint8_t phases[1] = {TILLER_GENERATED};

  for (int warm = 0; warm < 2; warm++) {
    for (int r = 0; r < rounds; r++) {
      for (int b = 0; b < BATCH; b++) memcpy(bufs + (size_t)b * D, x, sizeof x);
      double t0 = now_ns();
      for (int b = 0; b < BATCH; b++) {
        tiller_step *step;
        check(tiller_step_open(rt, ids, phases, 1, &step), "open");
        check(tiller_step_hook(step, "h", bufs + (size_t)b * D, TILLER_F32, 1, D), "hook");
        check(tiller_step_close(step, NULL, 0, NULL), "close");
      }
      full[r] = (now_ns() - t0) / BATCH;

      t0 = now_ns();
      for (int b = 0; b < BATCH; b++) {
        tiller_step *step;
        check(tiller_step_open(rt, ids, phases, 1, &step), "open");
        check(tiller_step_close(step, NULL, 0, NULL), "close");
      }
      step_only[r] = (now_ns() - t0) / BATCH;

      /* A step of no tokens and a hook call on it: the ABI's cost per call without the kernel. */
      t0 = now_ns();
      for (int b = 0; b < BATCH; b++) {
        tiller_step *step;
        check(tiller_step_open(rt, NULL, NULL, 0, &step), "open");
        check(tiller_step_hook(step, "h", bufs, TILLER_F32, 0, D), "hook");
        check(tiller_step_close(step, NULL, 0, NULL), "close");
      }
      empty[r] = (now_ns() - t0) / BATCH;
    }
  }
  report("open+hook+close", full, rounds);
  report("open+close (no hook)", step_only, rounds);
  report("0 tokens: open+hook+close", empty, rounds);

  check(tiller_request_end(rt, 1, NULL, 0, NULL), "end");
  tiller_runtime_free(rt);
  free(bufs);
  free(full);
  free(step_only);
  free(empty);
  return 0;
}
