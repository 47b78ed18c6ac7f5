/*
 * tiller-llama-run: llama.cpp with Tiller attached, from the command line. It prints one JSON object
 * on stdout; the tests and the overhead measurement run it.
 *
 *   tiller-llama-run embed --model M.gguf [--config C.toml] --layer N [--hook-format F]
 *                          [--profile P]... [--threads T] [--repeat R]      (texts on stdin, one a line)
 *     each text is its own request (ids 1, 2, ...), decoded alone; the i-th --profile (or the last
 *     one given) is its profile ("" for none). Prints the mean-pooled, L2-normalised embeddings,
 *     the token ids, each request's summary and the metrics.
 *
 *   tiller-llama-run generate --model M.gguf [--config C.toml] --layer N [--hook-format F]
 *                          --prompt IDS [--prompt IDS]... [--profile P]... --steps S [--threads T]
 *     the prompts (comma-separated token ids) are sequences 0, 1, ... of one batch, then S greedy
 *     steps decode one token per sequence in one batch. Prints each sequence's tokens and the
 *     logits of every step (the prompt's last position first), the summaries and the metrics.
 *     A sequence whose request a monitor stops ends there: nothing is sampled from the logits of
 *     the decode that stopped it, it leaves the batch (and the KV cache), and the others go on;
 *     its `stopped_at` is that decode's index (0: the prompt's), so it generated that many tokens.
 *
 * Without --config, llama.cpp runs without Tiller (no callback): the baseline.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tiller_llama.h"

#define MAX_LIST 64

struct args {
    const char *mode;
    const char *model;
    const char *config;
    const char *hook_format;
    int32_t layers[MAX_LIST];
    size_t n_layers;
    const char *profiles[MAX_LIST];
    size_t n_profiles;
    const char *prompts[MAX_LIST];
    size_t n_prompts;
    int steps;
    int threads;
    int repeat;
};

static void die(const char *what, const char *msg) {
    fprintf(stderr, "tiller-llama-run: %s: %s\n", what, msg);
    exit(1);
}

static void die_tiller(const char *what) {
    char buf[2048];
    size_t needed = 0;
    if (tiller_last_error(buf, sizeof buf, &needed) != TILLER_OK) {
        snprintf(buf, sizeof buf, "(message too long)");
    }
    die(what, buf);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void quiet_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static struct args parse(int argc, char **argv) {
    struct args a = {0};
    a.steps = 4;
    a.threads = 1;
    a.repeat = 1;
    if (argc < 2) {
        die("usage", "tiller-llama-run embed|generate --model M.gguf [options] (see the source)");
    }
    a.mode = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i];
        if (i + 1 >= argc) {
            die(k, "missing value");
        }
        const char *v = argv[++i];
        if (strcmp(k, "--model") == 0) {
            a.model = v;
        } else if (strcmp(k, "--config") == 0) {
            a.config = v;
        } else if (strcmp(k, "--hook-format") == 0) {
            a.hook_format = v;
        } else if (strcmp(k, "--layer") == 0) {
            if (a.n_layers == MAX_LIST) die(k, "too many");
            a.layers[a.n_layers++] = atoi(v);
        } else if (strcmp(k, "--profile") == 0) {
            if (a.n_profiles == MAX_LIST) die(k, "too many");
            a.profiles[a.n_profiles++] = v;
        } else if (strcmp(k, "--prompt") == 0) {
            if (a.n_prompts == MAX_LIST) die(k, "too many");
            a.prompts[a.n_prompts++] = v;
        } else if (strcmp(k, "--steps") == 0) {
            a.steps = atoi(v);
        } else if (strcmp(k, "--threads") == 0) {
            a.threads = atoi(v);
        } else if (strcmp(k, "--repeat") == 0) {
            a.repeat = atoi(v);
        } else {
            die(k, "unknown option");
        }
    }
    if (a.model == NULL) die("--model", "required");
    if (a.config != NULL && a.n_layers == 0) die("--layer", "required with --config");
    if (a.threads < 1 || a.repeat < 1 || a.steps < 0) die("options", "out of range");
    return a;
}

static const char *profile_of(const struct args *a, size_t i) {
    if (a->n_profiles == 0) return NULL;
    const char *p = a->profiles[i < a->n_profiles ? i : a->n_profiles - 1];
    return p[0] == '\0' ? NULL : p;
}

/* Prints a JSON string (the texts and summaries we print are UTF-8 already). */
static void print_json_string(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            printf("\\%c", c);
        } else if (c == '\n') {
            fputs("\\n", stdout);
        } else if (c < 0x20) {
            printf("\\u%04x", c);
        } else {
            putchar(c);
        }
    }
    putchar('"');
}

static void print_floats(const float *v, size_t n) {
    putchar('[');
    for (size_t i = 0; i < n; i++) {
        printf(i ? ",%.9g" : "%.9g", v[i]);
    }
    putchar(']');
}

struct host {
    tiller_runtime *rt;
    tiller_llama *adapter;
    struct llama_model *model;
    struct llama_context *ctx;
};

static struct host open_host(const struct args *a, int embeddings, uint32_t n_batch, uint32_t n_seq) {
    struct host h = {0};
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    h.model = llama_model_load_from_file(a->model, mp);
    if (h.model == NULL) die(a->model, "llama.cpp could not load the model");
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512 * n_seq;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = n_seq;
    cp.n_threads = a->threads;
    cp.n_threads_batch = a->threads;
    cp.embeddings = embeddings;
    cp.no_perf = true;
    /* f32 KV cache: what a comparison with a float reference needs (f16 is llama.cpp's default). */
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    /* As tiller_llama_attach sets it, with or without Tiller: the baseline runs the same context. */
    cp.kv_unified = true;
    if (embeddings) cp.pooling_type = LLAMA_POOLING_TYPE_MEAN;
    if (a->config != NULL) {
        if (tiller_runtime_new_from_file(a->config, &h.rt) != TILLER_OK) die_tiller(a->config);
        h.adapter = tiller_llama_new(h.rt, h.model, a->layers, a->n_layers, a->hook_format);
        if (h.adapter == NULL) die("tiller_llama_new", tiller_llama_last_error());
        tiller_llama_attach(h.adapter, &cp);
    }
    h.ctx = llama_init_from_model(h.model, cp);
    if (h.ctx == NULL) die(a->model, "llama.cpp could not create a context");
    return h;
}

static void close_host(struct host *h) {
    llama_free(h->ctx);
    tiller_llama_free(h->adapter);
    llama_model_free(h->model);
    tiller_runtime_free(h->rt);
    llama_backend_free();
}

static int32_t decode(struct host *h, struct llama_batch b) {
    if (h->adapter == NULL) return llama_decode(h->ctx, b);
    int32_t rc = tiller_llama_decode(h->adapter, h->ctx, b);
    if (rc != 0) die("decode", rc == TILLER_LLAMA_ERROR ? tiller_llama_last_error() : "llama_decode failed");
    return rc;
}

static void begin(struct host *h, const struct args *a, uint64_t id, llama_seq_id seq, size_t i) {
    if (h->rt == NULL) return;
    if (tiller_request_begin(h->rt, id, profile_of(a, i), NULL) != TILLER_OK) die_tiller("tiller_request_begin");
    if (tiller_llama_seq_begin(h->adapter, seq, id) != 0) die("seq_begin", tiller_llama_last_error());
}

/* Ends request `id` and prints its summary (JSON), or `null` without Tiller. */
static void print_summary(struct host *h, uint64_t id) {
    if (h->rt == NULL) {
        fputs("null", stdout);
        return;
    }
    size_t len = 4096, needed = 0;
    for (;;) {
        char *buf = malloc(len);
        if (buf == NULL) die("summary", "out of memory");
        tiller_status s = tiller_request_end(h->rt, id, buf, len, &needed);
        if (s == TILLER_OK) {
            fputs(buf, stdout);
            free(buf);
            return;
        }
        free(buf);
        if (s != TILLER_BUFFER_TOO_SMALL) die_tiller("tiller_request_end");
        len = needed;
    }
}

static void print_metrics(struct host *h) {
    if (h->rt == NULL) {
        fputs("null", stdout);
        return;
    }
    size_t len = 1 << 16, needed = 0;
    for (;;) {
        char *buf = malloc(len);
        if (buf == NULL) die("metrics", "out of memory");
        tiller_status s = tiller_metrics_text(h->rt, buf, len, &needed);
        if (s == TILLER_OK) {
            print_json_string(buf);
            free(buf);
            return;
        }
        free(buf);
        if (s != TILLER_BUFFER_TOO_SMALL) die_tiller("tiller_metrics_text");
        len = needed;
    }
}

static int run_embed(const struct args *a) {
    char *texts[1024];
    size_t n_texts = 0;
    char line[65536];
    while (n_texts < 1024 && fgets(line, sizeof line, stdin) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        texts[n_texts++] = strdup(line);
    }
    struct host h = open_host(a, 1, 512, 1);
    const struct llama_vocab *vocab = llama_model_get_vocab(h.model);
    int n_embd = llama_model_n_embd(h.model);
    float *emb = calloc((size_t)n_embd * n_texts, sizeof *emb);
    llama_token *ids[1024];
    int n_ids[1024];
    struct llama_batch b = llama_batch_init(512, 0, 1);
    for (size_t i = 0; i < n_texts; i++) {
        ids[i] = malloc(512 * sizeof(llama_token));
        n_ids[i] = llama_tokenize(vocab, texts[i], (int32_t)strlen(texts[i]), ids[i], 512, true, false);
        if (n_ids[i] < 0) die(texts[i], "longer than 512 tokens");
    }
    uint64_t total_tokens = 0;
    double t0 = now_seconds();
    for (int r = 0; r < a->repeat; r++) {
        for (size_t i = 0; i < n_texts; i++) {
            uint64_t id = 1 + i;
            begin(&h, a, id, 0, i);
            b.n_tokens = n_ids[i];
            for (int j = 0; j < n_ids[i]; j++) {
                b.token[j] = ids[i][j];
                b.pos[j] = j;
                b.n_seq_id[j] = 1;
                b.seq_id[j][0] = 0;
                b.logits[j] = 1;
            }
            llama_memory_clear(llama_get_memory(h.ctx), true);
            decode(&h, b);
            total_tokens += (uint64_t)n_ids[i];
            const float *e = llama_get_embeddings_seq(h.ctx, 0);
            if (e == NULL) die("embeddings", "llama.cpp gave none (is the model an embedding model?)");
            double norm = 0;
            for (int k = 0; k < n_embd; k++) norm += (double)e[k] * e[k];
            norm = norm > 0 ? 1.0 / __builtin_sqrt(norm) : 0;
            for (int k = 0; k < n_embd; k++) emb[i * n_embd + k] = (float)(e[k] * norm);
            if (h.rt != NULL) {
                if (tiller_llama_seq_end(h.adapter, 0) != 0) die("seq_end", tiller_llama_last_error());
                /* The last round's requests stay open: their summaries are printed below. */
                if (r + 1 < a->repeat) tiller_request_end(h.rt, id, NULL, 0, NULL);
            }
        }
    }
    double seconds = now_seconds() - t0;
    printf("{\"seconds\":%.6f,\"tokens\":%llu,\"ids\":[", seconds, (unsigned long long)total_tokens);
    for (size_t i = 0; i < n_texts; i++) {
        printf(i ? ",[" : "[");
        for (int j = 0; j < n_ids[i]; j++) printf(j ? ",%d" : "%d", ids[i][j]);
        putchar(']');
    }
    printf("],\"embeddings\":[");
    for (size_t i = 0; i < n_texts; i++) {
        if (i) putchar(',');
        print_floats(emb + i * n_embd, (size_t)n_embd);
    }
    printf("],\"summaries\":[");
    for (size_t i = 0; i < n_texts; i++) {
        if (i) putchar(',');
        print_summary(&h, 1 + i);
    }
    printf("],\"metrics\":");
    print_metrics(&h);
    printf("}\n");
    llama_batch_free(b);
    for (size_t i = 0; i < n_texts; i++) {
        free(ids[i]);
        free(texts[i]);
    }
    free(emb);
    close_host(&h);
    return 0;
}

static size_t parse_ids(const char *s, llama_token *out, size_t cap) {
    size_t n = 0;
    while (*s && n < cap) {
        char *end = NULL;
        long v = strtol(s, &end, 10);
        if (end == s) die("--prompt", "expects comma-separated token ids");
        out[n++] = (llama_token)v;
        s = *end == ',' ? end + 1 : end;
    }
    return n;
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (v[i] > v[best]) best = i;
    }
    return best;
}

static int run_generate(const struct args *a) {
    size_t n_seq = a->n_prompts;
    if (n_seq == 0) die("--prompt", "at least one");
    llama_token prompt[MAX_LIST][256];
    size_t n_prompt[MAX_LIST];
    size_t total = 0;
    for (size_t s = 0; s < n_seq; s++) {
        n_prompt[s] = parse_ids(a->prompts[s], prompt[s], 256);
        if (n_prompt[s] == 0) die("--prompt", "empty");
        total += n_prompt[s];
    }
    uint32_t n_batch = total > 512 ? (uint32_t)total : 512;
    struct host h = open_host(a, 0, n_batch, (uint32_t)n_seq);
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(h.model));
    for (size_t s = 0; s < n_seq; s++) begin(&h, a, 1 + s, (llama_seq_id)s, s);

    size_t n_steps = (size_t)a->steps + 1;
    float *logits = malloc(sizeof(float) * n_vocab * n_seq * n_steps);
    llama_token *tokens = malloc(sizeof(llama_token) * n_seq * n_steps);
    struct llama_batch b = llama_batch_init((int32_t)n_batch, 0, 1);
    /* The prompts: every position an output, so that a hook on any layer sees every row. */
    int last[MAX_LIST];
    /* Per sequence: the decode that stopped it (-1: running), and the steps whose logits it has. */
    int stopped_at[MAX_LIST];
    size_t n_out[MAX_LIST];
    for (size_t s = 0; s < n_seq; s++) {
        stopped_at[s] = -1;
        n_out[s] = 0;
    }
    b.n_tokens = 0;
    for (size_t s = 0; s < n_seq; s++) {
        for (size_t j = 0; j < n_prompt[s]; j++) {
            int k = b.n_tokens++;
            b.token[k] = prompt[s][j];
            b.pos[k] = (llama_pos)j;
            b.n_seq_id[k] = 1;
            b.seq_id[k][0] = (llama_seq_id)s;
            b.logits[k] = 1;
        }
        last[s] = b.n_tokens - 1;
    }
    double t0 = now_seconds();
    uint64_t decoded = 0;
    decode(&h, b);
    decoded += (uint64_t)b.n_tokens;
    for (size_t step = 0; step < n_steps; step++) {
        size_t running = 0;
        for (size_t s = 0; s < n_seq; s++) {
            if (stopped_at[s] < 0 && h.adapter != NULL &&
                tiller_llama_seq_stopped(h.adapter, (llama_seq_id)s) == 1) {
                /* Stopped by this step's decode: its logits are not sampled, its cache is freed. */
                stopped_at[s] = (int)step;
                llama_memory_seq_rm(llama_get_memory(h.ctx), (llama_seq_id)s, -1, -1);
            }
            if (stopped_at[s] >= 0) continue;
            const float *l = llama_get_logits_ith(h.ctx, last[s]);
            if (l == NULL) die("logits", "llama.cpp gave none");
            memcpy(logits + (step * n_seq + s) * n_vocab, l, sizeof(float) * n_vocab);
            tokens[step * n_seq + s] = argmax(l, n_vocab);
            n_out[s]++;
            running++;
        }
        if (step + 1 == n_steps || running == 0) break;
        b.n_tokens = 0;
        for (size_t s = 0; s < n_seq; s++) {
            if (stopped_at[s] >= 0) continue;
            int k = b.n_tokens++;
            b.token[k] = tokens[step * n_seq + s];
            b.pos[k] = (llama_pos)(n_prompt[s] + step);
            b.n_seq_id[k] = 1;
            b.seq_id[k][0] = (llama_seq_id)s;
            b.logits[k] = 1;
            last[s] = k;
        }
        decode(&h, b);
        decoded += (uint64_t)b.n_tokens;
    }
    double seconds = now_seconds() - t0;
    printf("{\"seconds\":%.6f,\"tokens\":%llu,\"sequences\":[", seconds, (unsigned long long)decoded);
    for (size_t s = 0; s < n_seq; s++) {
        /* The tokens fed back: one per decode after the prompt's, up to the one that stopped it. */
        size_t n_gen = stopped_at[s] >= 0 ? (size_t)stopped_at[s] : n_steps - 1;
        printf(s ? ",{\"generated\":[" : "{\"generated\":[");
        for (size_t step = 0; step < n_gen; step++) printf(step ? ",%d" : "%d", tokens[step * n_seq + s]);
        printf("],\"stopped_at\":");
        if (stopped_at[s] >= 0) {
            printf("%d", stopped_at[s]);
        } else {
            fputs("null", stdout);
        }
        printf(",\"logits\":[");
        for (size_t step = 0; step < n_out[s]; step++) {
            if (step) putchar(',');
            print_floats(logits + (step * n_seq + s) * n_vocab, (size_t)n_vocab);
        }
        printf("]}");
    }
    printf("],\"summaries\":[");
    for (size_t s = 0; s < n_seq; s++) {
        if (s) putchar(',');
        if (h.adapter != NULL && tiller_llama_seq_end(h.adapter, (llama_seq_id)s) != 0) {
            die("seq_end", tiller_llama_last_error());
        }
        print_summary(&h, 1 + s);
    }
    printf("],\"metrics\":");
    print_metrics(&h);
    printf("}\n");
    llama_batch_free(b);
    free(logits);
    free(tokens);
    close_host(&h);
    return 0;
}

int main(int argc, char **argv) {
    struct args a = parse(argc, argv);
    if (strcmp(a.mode, "embed") == 0) return run_embed(&a);
    if (strcmp(a.mode, "generate") == 0) return run_generate(&a);
    die(a.mode, "unknown mode (embed, generate)");
    return 1;
}
