/*
 * A minimal C host over libtiller: continuous batching of four requests with different steering
 * (two profiles, per-request overrides, none), one hook per forward step, the requests a monitor
 * asks to stop ended early, then each request's summary (the features that fired, the events, the
 * edits) and the runtime's metrics.
 *
 * Usage: c-host <tiller.toml> <w_dec.f32>
 *
 * A real host gets its activations from the model. This one stands in for the model: each token's
 * residual vector is a sum of a few of the dictionary's decoder rows (read from w_dec.f32, written
 * by make_sae.py) plus noise, so the features that should fire are known.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tiller.h"

#define HOOK "blocks.6.hook_resid_post"
#define DICT "res6"
#define D_IN 256
#define D_SAE 512
#define MAX_BATCH 32

/* Prints the failed call and the library's message, and exits. */
#define TRY(call)                                                                                  \
  do {                                                                                             \
    tiller_status s_ = (call);                                                                     \
    if (s_ != TILLER_OK) die(#call, s_);                                                           \
  } while (0)

static void die(const char *call, tiller_status s) {
  char msg[4096];
  if (tiller_last_error(msg, sizeof msg, NULL) != TILLER_OK) strcpy(msg, "(message too long)");
  fprintf(stderr, "c-host: %s failed with status %u: %s\n", call, (unsigned)s, msg);
  exit(1);
}

/* Output strings: ask for the size (a NULL buffer answers TILLER_BUFFER_TOO_SMALL with the size
 * in `needed`), allocate it, fetch. */
static char *metrics_text(const tiller_runtime *rt) {
  size_t needed = 0;
  tiller_status s = tiller_metrics_text(rt, NULL, 0, &needed);
  if (s != TILLER_BUFFER_TOO_SMALL) die("tiller_metrics_text", s);
  char *buf = malloc(needed);
  if (!buf) abort();
  TRY(tiller_metrics_text(rt, buf, needed, &needed));
  return buf;
}

/* Ends a request and returns its summary (JSON). A too-small buffer leaves the request running,
 * so the size query and the end are two calls. */
static char *end_request(const tiller_runtime *rt, uint64_t id) {
  size_t needed = 0;
  tiller_status s = tiller_request_summary(rt, id, NULL, 0, &needed);
  if (s != TILLER_BUFFER_TOO_SMALL) die("tiller_request_summary", s);
  for (;;) {
    char *buf = malloc(needed);
    if (!buf) abort();
    s = tiller_request_end(rt, id, buf, needed, &needed);
    if (s == TILLER_OK) return buf;
    free(buf);
    if (s != TILLER_BUFFER_TOO_SMALL) die("tiller_request_end", s);
  }
}

/* ---------------------------------------------------------------------------------------------- */
/* Just enough JSON to print a summary. A real host would use its JSON library; the summary is
 * {"request":1,"profile":"p","tokens":11,"features":{"res6":{"7":{"max":2.3,"count":5}}},
 *  "events":[{"monitor":"m","action":"flag","request":1,"token":4,"value":3.0}],
 *  "steering":{"ablate-7":11},"flagged":true,"stopped":false}.                                   */

static const char *skip_ws(const char *p) {
  while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
  return p;
}

/* Reads a string without escapes into `out`; returns the position after it, or NULL. */
static const char *read_string(const char *p, char *out, size_t cap) {
  p = skip_ws(p);
  if (*p++ != '"') return NULL;
  size_t n = 0;
  while (*p && *p != '"') {
    if (n + 1 < cap) out[n++] = *p;
    p++;
  }
  out[n] = 0;
  return *p == '"' ? p + 1 : NULL;
}

/* The value after `"key":` at the top level of the summary (the first occurrence). */
static const char *field(const char *json, const char *key) {
  char pat[64];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  return p ? skip_ws(p + strlen(pat)) : NULL;
}

/* Prints "features": per dictionary, each feature's largest activation and active tokens. */
static void print_features(const char *json) {
  const char *p = field(json, "features");
  if (!p || *p != '{') return;
  p = skip_ws(p + 1);
  while (*p == '"') {
    char dict[64], feat[32];
    if (!(p = read_string(p, dict, sizeof dict))) return;
    p = skip_ws(p);
    if (*p++ != ':' || *(p = skip_ws(p)) != '{') return;
    p = skip_ws(p + 1);
    printf("    features that fired (%s):", dict);
    int any = 0;
    while (*p == '"') {
      double max = 0;
      long long count = 0;
      if (!(p = read_string(p, feat, sizeof feat))) return;
      p = skip_ws(p);
      if (*p++ != ':' || *(p = skip_ws(p)) != '{') return;
      p++;
      while (*(p = skip_ws(p)) == '"') { /* "max": x, "count": n */
        char key[16];
        if (!(p = read_string(p, key, sizeof key))) return;
        p = skip_ws(p);
        if (*p++ != ':') return;
        char *end;
        double v = strtod(p, &end);
        p = skip_ws(end);
        if (strcmp(key, "max") == 0) max = v;
        if (strcmp(key, "count") == 0) count = (long long)v;
        if (*p == ',') p++;
      }
      if (*p++ != '}') return;
      printf("%s %s (max %.2f, %lld tokens)", any ? "," : "", feat, max, count);
      any = 1;
      p = skip_ws(p);
      if (*p == ',') p = skip_ws(p + 1);
    }
    printf("%s\n", any ? "" : " none");
    if (*p++ != '}') return;
    p = skip_ws(p);
    if (*p == ',') p = skip_ws(p + 1);
  }
}

/* Prints the monitors that fired, from "events". */
static void print_events(const char *json) {
  const char *p = field(json, "events");
  const char *end = p ? strchr(p, ']') : NULL;
  printf("    events:");
  int any = 0;
  while (p && (p = strstr(p, "\"monitor\":")) && p < end) {
    char name[64], action[32] = "";
    p = read_string(p + strlen("\"monitor\":"), name, sizeof name);
    const char *a = p ? strstr(p, "\"action\":") : NULL;
    if (a && a < end) read_string(a + strlen("\"action\":"), action, sizeof action);
    const char *t = p ? strstr(p, "\"token\":") : NULL;
    long token = t && t < end ? strtol(t + strlen("\"token\":"), NULL, 10) : -1;
    printf("%s %s (%s at token %ld)", any ? "," : "", name, action, token);
    any = 1;
  }
  printf("%s\n", any ? "" : " none");
}

static int is_true(const char *json, const char *key) {
  const char *p = field(json, key);
  return p && strncmp(p, "true", 4) == 0;
}

static unsigned long long number(const char *json, const char *key) {
  const char *p = field(json, key);
  return p ? strtoull(p, NULL, 10) : 0;
}

static void print_summary(const char *json) {
  char profile[64] = "none";
  const char *p = field(json, "profile");
  if (p && *p == '"') read_string(p, profile, sizeof profile);
  const char *steering = field(json, "steering");
  const char *steering_end = steering ? strchr(steering, '}') : NULL;
  printf("  request %llu done: profile %s, %llu tokens, flagged %s, stopped %s, edits %.*s\n",
         number(json, "request"), profile, number(json, "tokens"),
         is_true(json, "flagged") ? "yes" : "no", is_true(json, "stopped") ? "yes" : "no",
         steering_end ? (int)(steering_end - steering + 1) : 2, steering_end ? steering : "{}");
  print_features(json);
  print_events(json);
}

/* ---------------------------------------------------------------------------------------------- */
/* The stand-in for the model.                                                                    */

static float w_dec[D_SAE][D_IN];
static uint64_t rng = 88172645463325252ULL;

static double uniform(void) {
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
}

static float gauss(void) {
  return (float)(sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
}

struct topic {
  int feature;
  float weight;
  float ramp; /* added per generated token */
};

/* A request: its steering, when it arrives, how long it is, what its tokens are about. */
struct request {
  uint64_t id;
  const char *profile;
  const char *overrides;
  int arrive, prompt, generate;
  struct topic topics[3];
  int generated, done;
};

static void token_activations(const struct request *r, float *x) {
  for (int i = 0; i < D_IN; i++) x[i] = 0.02f * gauss();
  for (int k = 0; k < 3 && r->topics[k].weight > 0; k++) {
    float w = (r->topics[k].weight + r->topics[k].ramp * (float)r->generated) * (1 + 0.1f * gauss());
    for (int i = 0; i < D_IN; i++) x[i] += w * w_dec[r->topics[k].feature][i];
  }
}

static void load_decoder(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f || fread(w_dec, sizeof(float), D_SAE * D_IN, f) != D_SAE * D_IN) {
    fprintf(stderr, "c-host: cannot read %d x %d float32 from %s\n", D_SAE, D_IN, path);
    exit(1);
  }
  fclose(f);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: c-host <tiller.toml> <w_dec.f32>\n");
    return 2;
  }
  load_decoder(argv[2]);

  char info[512];
  TRY(tiller_build_info(info, sizeof info, NULL));
  printf("libtiller %s %s\n", tiller_version(), info);

  tiller_runtime *rt = NULL;
  TRY(tiller_runtime_new_from_file(argv[1], &rt));

  struct request requests[] = {
      {1, "suppress-7", NULL, 0, 5, 6, {{7, 2.5f, 0}, {31, 1.5f, 0}}, 0, 0},
      {2, "golden-gate", NULL, 1, 4, 5, {{42, 1.0f, 0}, {100, 2.6f, 0}}, 0, 0},
      {3, NULL,
       "{\"steer\": [{\"name\": \"more-100\", \"dictionary\": \"" DICT "\", \"op\": \"add\", "
       "\"feature\": 100, \"strength\": 3.0, \"apply_to\": \"generated\"}]}",
       2, 3, 4, {{100, 1.5f, 0}}, 0, 0},
      /* Feature 250 grows with each generated token until the alarm-250 monitor stops it. */
      {4, "suppress-7", NULL, 3, 3, 8, {{7, 2.0f, 0}, {250, 1.0f, 0.6f}}, 0, 0},
  };
  const int n_requests = sizeof requests / sizeof requests[0];

  float hidden[MAX_BATCH * D_IN], before[MAX_BATCH * D_IN];
  uint64_t ids[MAX_BATCH];
  uint8_t phases[MAX_BATCH];
  int remaining = n_requests;

  for (int step_no = 0; remaining > 0; step_no++) {
    /* The batch: the prompt of each request that arrives now, one token of each running one. */
    size_t n = 0;
    for (int i = 0; i < n_requests; i++) {
      struct request *r = &requests[i];
      if (r->done) continue;
      if (step_no == r->arrive) {
        TRY(tiller_request_begin(rt, r->id, r->profile, r->overrides));
        for (int t = 0; t < r->prompt && n < MAX_BATCH; t++, n++) {
          ids[n] = r->id;
          phases[n] = TILLER_PROMPT;
          token_activations(r, hidden + n * D_IN);
        }
      } else if (step_no > r->arrive && r->generated < r->generate && n < MAX_BATCH) {
        ids[n] = r->id;
        phases[n] = TILLER_GENERATED;
        token_activations(r, hidden + n * D_IN);
        r->generated++;
        n++;
      }
    }
    if (n == 0) continue;

    memcpy(before, hidden, n * D_IN * sizeof(float));
    tiller_step *step = NULL;
    TRY(tiller_step_open(rt, ids, phases, n, &step));
    TRY(tiller_step_hook(step, HOOK, hidden, TILLER_F32, n, D_IN)); /* edited in place */
    uint64_t stop[MAX_BATCH];
    size_t n_stop = 0;
    TRY(tiller_step_close(step, stop, MAX_BATCH, &n_stop));

    printf("step %2d: %2zu tokens, edit norms [", step_no, n);
    for (size_t t = 0; t < n; t++) {
      double d2 = 0;
      for (int i = 0; i < D_IN; i++) {
        double d = hidden[t * D_IN + i] - before[t * D_IN + i];
        d2 += d * d;
      }
      printf("%sr%llu%c:%.2f", t ? " " : "", (unsigned long long)ids[t],
             phases[t] == TILLER_PROMPT ? 'p' : 'g', sqrt(d2));
    }
    printf("]");
    for (size_t k = 0; k < n_stop && k < MAX_BATCH; k++)
      printf("%s%llu", k ? ", " : ", stop requested for ", (unsigned long long)stop[k]);
    printf("\n");

    /* End the requests that are finished, and those a monitor asked to stop. */
    for (int i = 0; i < n_requests; i++) {
      struct request *r = &requests[i];
      int stopped = 0;
      for (size_t k = 0; k < n_stop && k < MAX_BATCH; k++) stopped |= stop[k] == r->id;
      if (r->done || step_no < r->arrive || (r->generated < r->generate && !stopped)) continue;
      char *summary = end_request(rt, r->id);
      print_summary(summary);
      free(summary);
      r->done = 1;
      remaining--;
    }
  }

  printf("\nmetrics:\n");
  char *text = metrics_text(rt);
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    if (line[0] == '#') continue;
    static const char *shown[] = {"tiller_tokens_total",         "tiller_steering_tokens_total",
                                  "tiller_monitor_events_total", "tiller_feature_active_total",
                                  "tiller_dictionary_fvu",       "tiller_dictionary_l0"};
    for (size_t k = 0; k < sizeof shown / sizeof shown[0]; k++)
      if (strncmp(line, shown[k], strlen(shown[k])) == 0 && line[strlen(shown[k])] == '{')
        printf("  %s\n", line);
  }
  free(text);
  tiller_runtime_free(rt);
  return 0;
}
