/* tiller_llama: Tiller attached to llama.cpp through its eval callback. See tiller_llama.h. */
#include "tiller_llama.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml-backend.h"
#include "ggml.h"

#define HOOK_NAME_MAX 128
#define MAX_SEQ 65536

struct hooked_layer {
    int32_t layer;
    char hook[HOOK_NAME_MAX];
};

struct tiller_llama {
    const tiller_runtime *rt;
    int32_t n_layer;
    struct hooked_layer *hooks;
    size_t n_hooks;

    /* Sequence bindings, indexed by sequence id. */
    uint64_t *seq_request;
    uint8_t *seq_bound;
    uint8_t *seq_prompted; /* its prompt has been decoded */
    uint8_t *seq_stopped;  /* a monitor stopped its request: its tokens are refused */
    size_t *seq_prompt;    /* its prompt's length when the host gave it (else SIZE_MAX) */
    size_t *seq_decoded;   /* its tokens decoded since tiller_llama_seq_begin */
    size_t seq_cap;

    /* The decode in progress. */
    tiller_step *step;
    size_t step_tokens;
    size_t hooked;
    int failed;
    char error[1024];

    /* Scratch for tiller_step_open, grown to the largest batch. */
    uint64_t *ids;
    uint8_t *phases;
    /* The decode in progress's sequence of each token, marked prompted when it succeeds. */
    llama_seq_id *seqs;
    size_t scratch_cap;

    uint64_t *stops;
    size_t n_stops;
    size_t stops_cap;
};

static _Thread_local char last_error[1024];

static void set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
}

/* Appends Tiller's own message for the last failed call on this thread. */
static void tiller_message(char *buf, size_t len) {
    size_t needed = 0;
    if (tiller_last_error(buf, len, &needed) != TILLER_OK && len > 0) {
        buf[0] = '\0';
    }
}

const char *tiller_llama_last_error(void) { return last_error; }

tiller_llama *tiller_llama_new(const tiller_runtime *rt, const struct llama_model *model,
                               const int32_t *layers, size_t n_layers, const char *hook_format) {
    last_error[0] = '\0';
    if (rt == NULL || model == NULL || (layers == NULL && n_layers > 0)) {
        set_error("tiller_llama_new: NULL runtime, model or layers");
        return NULL;
    }
    if (n_layers == 0) {
        set_error("tiller_llama_new: no layers to hook");
        return NULL;
    }
    const char *fmt = hook_format != NULL ? hook_format : "blk.%d";
    /* Exactly one conversion, and it is %d: the format is the host's, the layer is ours. */
    const char *pct = strchr(fmt, '%');
    if (pct == NULL || pct[1] != 'd' || strchr(pct + 2, '%') != NULL) {
        set_error("tiller_llama_new: hook_format \"%s\" must contain exactly one %%d", fmt);
        return NULL;
    }
    int32_t n_layer = llama_model_n_layer(model);
    tiller_llama *a = calloc(1, sizeof *a);
    if (a == NULL) {
        set_error("tiller_llama_new: out of memory");
        return NULL;
    }
    a->rt = rt;
    a->n_layer = n_layer;
    a->hooks = calloc(n_layers, sizeof *a->hooks);
    if (a->hooks == NULL) {
        set_error("tiller_llama_new: out of memory");
        free(a);
        return NULL;
    }
    for (size_t i = 0; i < n_layers; i++) {
        if (layers[i] < 0 || layers[i] >= n_layer) {
            set_error("tiller_llama_new: layer %d does not exist (the model has %d layers)", layers[i],
                      n_layer);
            tiller_llama_free(a);
            return NULL;
        }
        for (size_t j = 0; j < i; j++) {
            if (layers[j] == layers[i]) {
                set_error("tiller_llama_new: layer %d is listed twice", layers[i]);
                tiller_llama_free(a);
                return NULL;
            }
        }
        a->hooks[i].layer = layers[i];
        int n = snprintf(a->hooks[i].hook, HOOK_NAME_MAX, fmt, layers[i]);
        if (n < 0 || n >= HOOK_NAME_MAX) {
            set_error("tiller_llama_new: hook name for layer %d is longer than %d bytes", layers[i],
                      HOOK_NAME_MAX - 1);
            tiller_llama_free(a);
            return NULL;
        }
    }
    a->n_hooks = n_layers;
    return a;
}

void tiller_llama_free(tiller_llama *a) {
    if (a == NULL) {
        return;
    }
    if (a->step != NULL) {
        tiller_step_free(a->step);
    }
    free(a->hooks);
    free(a->seq_request);
    free(a->seq_bound);
    free(a->seq_prompted);
    free(a->seq_stopped);
    free(a->seq_prompt);
    free(a->seq_decoded);
    free(a->ids);
    free(a->seqs);
    free(a->phases);
    free(a->stops);
    free(a);
}

void tiller_llama_attach(tiller_llama *a, struct llama_context_params *params) {
    if (params == NULL) {
        return;
    }
    params->cb_eval = tiller_llama_eval_callback;
    params->cb_eval_user_data = a;
    /* One KV stream for all sequences: llama.cpp then cuts a batch into micro-batches in batch
     * order (with a stream per sequence it takes equal slices of each, reordering the tokens). */
    params->kv_unified = true;
}

static int grow_seqs(tiller_llama *a, size_t need) {
    if (need <= a->seq_cap) {
        return 0;
    }
    size_t cap = a->seq_cap ? a->seq_cap : 16;
    while (cap < need) {
        cap *= 2;
    }
    uint64_t *r = realloc(a->seq_request, cap * sizeof *r);
    if (r == NULL) {
        return -1;
    }
    a->seq_request = r;
    uint8_t *b = realloc(a->seq_bound, cap);
    if (b == NULL) {
        return -1;
    }
    a->seq_bound = b;
    uint8_t *p = realloc(a->seq_prompted, cap);
    if (p == NULL) {
        return -1;
    }
    a->seq_prompted = p;
    uint8_t *st = realloc(a->seq_stopped, cap);
    if (st == NULL) {
        return -1;
    }
    a->seq_stopped = st;
    size_t *pl = realloc(a->seq_prompt, cap * sizeof *pl);
    if (pl == NULL) {
        return -1;
    }
    a->seq_prompt = pl;
    size_t *dec = realloc(a->seq_decoded, cap * sizeof *dec);
    if (dec == NULL) {
        return -1;
    }
    a->seq_decoded = dec;
    memset(a->seq_decoded + a->seq_cap, 0, (cap - a->seq_cap) * sizeof *dec);
    for (size_t k = a->seq_cap; k < cap; k++) {
        a->seq_prompt[k] = SIZE_MAX;
    }
    memset(a->seq_request + a->seq_cap, 0, (cap - a->seq_cap) * sizeof *r);
    memset(a->seq_bound + a->seq_cap, 0, cap - a->seq_cap);
    memset(a->seq_prompted + a->seq_cap, 0, cap - a->seq_cap);
    memset(a->seq_stopped + a->seq_cap, 0, cap - a->seq_cap);
    a->seq_cap = cap;
    return 0;
}

int tiller_llama_seq_begin(tiller_llama *a, llama_seq_id seq, uint64_t request_id) {
    if (a == NULL) {
        set_error("tiller_llama_seq_begin: NULL adapter");
        return -1;
    }
    if (seq < 0 || seq >= MAX_SEQ) {
        set_error("tiller_llama_seq_begin: sequence id %d out of range [0, %d)", seq, MAX_SEQ);
        return -1;
    }
    if (grow_seqs(a, (size_t)seq + 1) != 0) {
        set_error("tiller_llama_seq_begin: out of memory");
        return -1;
    }
    a->seq_request[seq] = request_id;
    a->seq_bound[seq] = 1;
    a->seq_prompted[seq] = 0;
    a->seq_stopped[seq] = 0;
    a->seq_prompt[seq] = SIZE_MAX;
    a->seq_decoded[seq] = 0;
    return 0;
}

int tiller_llama_seq_prompt(tiller_llama *a, llama_seq_id seq, size_t n_prompt) {
    if (a == NULL) {
        set_error("tiller_llama_seq_prompt: NULL adapter");
        return -1;
    }
    if (seq < 0 || (size_t)seq >= a->seq_cap || !a->seq_bound[seq]) {
        set_error("tiller_llama_seq_prompt: sequence %d carries no request", seq);
        return -1;
    }
    if (a->seq_decoded[seq] != 0) {
        set_error("tiller_llama_seq_prompt: sequence %d has decoded %zu tokens already; give its "
                  "prompt's length before its first decode",
                  seq, a->seq_decoded[seq]);
        return -1;
    }
    a->seq_prompt[seq] = n_prompt;
    return 0;
}

int tiller_llama_seq_end(tiller_llama *a, llama_seq_id seq) {
    if (a == NULL) {
        set_error("tiller_llama_seq_end: NULL adapter");
        return -1;
    }
    if (seq < 0 || (size_t)seq >= a->seq_cap || !a->seq_bound[seq]) {
        set_error("tiller_llama_seq_end: sequence %d carries no request", seq);
        return -1;
    }
    a->seq_bound[seq] = 0;
    a->seq_prompted[seq] = 0;
    a->seq_stopped[seq] = 0;
    return 0;
}

int tiller_llama_seq_stopped(const tiller_llama *a, llama_seq_id seq) {
    if (a == NULL) {
        set_error("tiller_llama_seq_stopped: NULL adapter");
        return -1;
    }
    if (seq < 0 || (size_t)seq >= a->seq_cap || !a->seq_bound[seq]) {
        set_error("tiller_llama_seq_stopped: sequence %d carries no request", seq);
        return -1;
    }
    return a->seq_stopped[seq] ? 1 : 0;
}

/* The index of the hooked layer whose output `t` is, or -1. */
static int match_node(const tiller_llama *a, const struct ggml_tensor *t) {
    int layer = -1;
    if (strncmp(t->name, "l_out-", 6) == 0) {
        char *end = NULL;
        long v = strtol(t->name + 6, &end, 10);
        if (end != t->name + 6 && *end == '\0' && v >= 0 && v < a->n_layer) {
            layer = (int)v;
        }
    } else if (t->op == GGML_OP_ADD && t->src[1] != NULL &&
               strncmp(t->src[1]->name, "blk.", 4) == 0) {
        /* BERT-style graphs: layer N ends with the bias of blk.N.layer_output_norm. */
        const char *s = t->src[1]->name + 4;
        char *end = NULL;
        long v = strtol(s, &end, 10);
        if (end != s && strcmp(end, ".layer_output_norm.bias") == 0 && v >= 0 && v < a->n_layer) {
            layer = (int)v;
        }
    }
    if (layer < 0) {
        return -1;
    }
    for (size_t i = 0; i < a->n_hooks; i++) {
        if (a->hooks[i].layer == layer) {
            return (int)i;
        }
    }
    return -1;
}

static void fail(tiller_llama *a, const char *fmt, ...) {
    if (a->failed) {
        return; /* keep the first error */
    }
    a->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->error, sizeof a->error, fmt, ap);
    va_end(ap);
}

bool tiller_llama_eval_callback(struct ggml_tensor *t, bool ask, void *user_data) {
    tiller_llama *a = user_data;
    /* Outside tiller_llama_decode (a plain llama_decode, a warm-up) nothing is hooked, and
     * answering false keeps the graph in one piece. */
    if (a == NULL || a->step == NULL || t == NULL) {
        return ask ? false : true;
    }
    int h = match_node(a, t);
    if (ask) {
        return h >= 0;
    }
    /* From here on, always answer true: false only stops the current split, and llama.cpp would
     * then return outputs computed from a partial graph. A failure leaves the activations as the
     * model computed them and is reported by tiller_llama_decode. */
    if (h < 0 || a->failed) {
        return true;
    }
    const struct hooked_layer *hl = &a->hooks[h];
    if (t->buffer != NULL && !ggml_backend_buffer_is_host(t->buffer)) {
        fail(a,
             "layer %d's output (%s) is in device memory (buffer %s): the llama.cpp adapter supports "
             "the CPU backend only",
             hl->layer, t->name, ggml_backend_buffer_name(t->buffer));
        return true;
    }
    uint32_t dtype;
    switch (t->type) {
    case GGML_TYPE_F32:
        dtype = TILLER_F32;
        break;
    case GGML_TYPE_F16:
        dtype = TILLER_F16;
        break;
    case GGML_TYPE_BF16:
        dtype = TILLER_BF16;
        break;
    default:
        fail(a, "layer %d's output has type %s; Tiller takes f32, f16 or bf16", hl->layer,
             ggml_type_name(t->type));
        return true;
    }
    if (!ggml_is_contiguous(t) || t->ne[2] != 1 || t->ne[3] != 1) {
        fail(a, "layer %d's output is not a contiguous [tokens, width] matrix (ne %lld %lld %lld %lld)",
             hl->layer, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2],
             (long long)t->ne[3]);
        return true;
    }
    size_t width = (size_t)t->ne[0];
    size_t rows = (size_t)t->ne[1];
    if (rows != a->step_tokens) {
        if (rows < a->step_tokens && hl->layer == a->n_layer - 1) {
            fail(a,
                 "layer %d is the model's last: llama.cpp computes it for the batch's output tokens "
                 "only (%zu of %zu); mark every token as an output (batch.logits[i] = 1) or hook an "
                 "earlier layer",
                 hl->layer, rows, a->step_tokens);
        } else {
            fail(a,
                 "layer %d's output has %zu rows for a batch of %zu tokens: llama.cpp split the "
                 "batch (a context made without kv_unified, which tiller_llama_attach sets?)",
                 hl->layer, rows, a->step_tokens);
        }
        return true;
    }
    if (t->data == NULL) {
        fail(a, "layer %d's output has no data", hl->layer);
        return true;
    }
    tiller_status s = tiller_step_hook(a->step, hl->hook, t->data, dtype, rows, width);
    if (s != TILLER_OK) {
        char msg[768];
        tiller_message(msg, sizeof msg);
        fail(a, "hook %s (layer %d): %s", hl->hook, hl->layer, msg);
        return true;
    }
    a->hooked++;
    return true;
}

static int grow_scratch(tiller_llama *a, size_t n) {
    if (n <= a->scratch_cap) {
        return 0;
    }
    uint64_t *ids = realloc(a->ids, n * sizeof *ids);
    if (ids == NULL) {
        return -1;
    }
    a->ids = ids;
    uint8_t *ph = realloc(a->phases, n);
    if (ph == NULL) {
        return -1;
    }
    a->phases = ph;
    llama_seq_id *seqs = realloc(a->seqs, n * sizeof *seqs);
    if (seqs == NULL) {
        return -1;
    }
    a->seqs = seqs;
    a->scratch_cap = n;
    return 0;
}

/* Takes back the decoded-token count of the first `n` tokens of the batch being opened. */
static void uncount(tiller_llama *a, size_t n) {
    for (size_t i = 0; i < n; i++) {
        a->seq_decoded[a->seqs[i]]--;
    }
}

int tiller_llama_begin(tiller_llama *a, struct llama_batch batch, uint32_t n_ubatch) {
    last_error[0] = '\0';
    if (a == NULL) {
        set_error("tiller_llama_begin: NULL adapter");
        return -1;
    }
    if (a->step != NULL) {
        set_error("tiller_llama_begin: a decode is already in progress on this adapter");
        return -1;
    }
    a->n_stops = 0;
    a->hooked = 0;
    if (batch.n_tokens <= 0) {
        set_error("tiller_llama_begin: empty batch");
        return -1;
    }
    size_t n = (size_t)batch.n_tokens;
    if (n > n_ubatch) {
        set_error("tiller_llama_begin: a batch of %zu tokens is split into micro-batches of %u; "
                  "the adapter needs one (raise n_ubatch, or decode smaller batches)",
                  n, n_ubatch);
        return -1;
    }
    if (batch.seq_id == NULL || batch.n_seq_id == NULL) {
        set_error("tiller_llama_begin: the batch has no sequence ids (use llama_batch_init)");
        return -1;
    }
    if (grow_scratch(a, n) != 0) {
        set_error("tiller_llama_begin: out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (batch.n_seq_id[i] < 1 || batch.seq_id[i] == NULL) {
            uncount(a, i);
            set_error("tiller_llama_begin: token %zu has no sequence id", i);
            return -1;
        }
        llama_seq_id s = batch.seq_id[i][0];
        if (s < 0 || (size_t)s >= a->seq_cap || !a->seq_bound[s]) {
            uncount(a, i);
            set_error("tiller_llama_begin: token %zu belongs to sequence %d, which carries no "
                      "request (call tiller_llama_seq_begin)",
                      i, s);
            return -1;
        }
        if (a->seq_stopped[s]) {
            uncount(a, i);
            /* A stop is a stop: a host that missed it must not decode the sequence further. */
            set_error("tiller_llama_begin: token %zu belongs to sequence %d, whose request %llu a "
                      "monitor stopped: drop the sequence from the batch (tiller_llama_seq_stopped) "
                      "and end it (tiller_llama_seq_end)",
                      i, s, (unsigned long long)a->seq_request[s]);
            return -1;
        }
        a->ids[i] = a->seq_request[s];
        if (a->seq_prompt[s] != SIZE_MAX) {
            /* The host gave the prompt's length: a token is a prompt token by its index in the
             * sequence, whatever decode carries it (prompts prefilled in chunks). The count is
             * advanced here for the batch's own tokens, and taken back unless the decode succeeds. */
            a->phases[i] = a->seq_decoded[s] < a->seq_prompt[s] ? TILLER_PROMPT : TILLER_GENERATED;
        } else {
            a->phases[i] = a->seq_prompted[s] ? TILLER_GENERATED : TILLER_PROMPT;
        }
        a->seqs[i] = s;
        a->seq_decoded[s]++;
    }
    /* A step's stops are among its requests: at most one per token. */
    if (a->stops_cap < n) {
        uint64_t *st = realloc(a->stops, n * sizeof *st);
        if (st == NULL) {
            uncount(a, n);
            set_error("tiller_llama_begin: out of memory");
            return -1;
        }
        a->stops = st;
        a->stops_cap = n;
    }
    tiller_step *step = NULL;
    if (tiller_step_open(a->rt, a->ids, a->phases, n, &step) != TILLER_OK) {
        char msg[768];
        tiller_message(msg, sizeof msg);
        uncount(a, n);
        set_error("tiller_llama_begin: tiller_step_open: %s", msg);
        return -1;
    }
    a->step = step;
    a->step_tokens = n;
    a->failed = 0;
    a->error[0] = '\0';
    return 0;
}

/* Closes the decode's step and marks every sequence carrying a request a monitor stopped in it.
 * Returns 0, or -1 with Tiller's message in `msg` (the step is gone either way). */
static int close_step(tiller_llama *a, tiller_step *step, char *msg, size_t len) {
    size_t n_stop = 0;
    if (tiller_step_close(step, a->stops, a->stops_cap, &n_stop) != TILLER_OK) {
        tiller_message(msg, len);
        return -1;
    }
    a->n_stops = n_stop;
    size_t listed = n_stop < a->stops_cap ? n_stop : a->stops_cap;
    for (size_t k = 0; k < listed; k++) {
        for (size_t s = 0; s < a->seq_cap; s++) {
            if (a->seq_bound[s] && a->seq_request[s] == a->stops[k]) {
                a->seq_stopped[s] = 1;
            }
        }
    }
    return 0;
}

/* Reports a failed decode, after closing its step: a monitor that fired at a hook before the
 * failure has stopped its request in the runtime (its summary says so), and a host that only
 * saw the error would go on generating for it. */
__attribute__((format(printf, 3, 4))) static int end_failed(tiller_llama *a, tiller_step *step,
                                                             const char *fmt, ...) {
    char why[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    char msg[768];
    if (close_step(a, step, msg, sizeof msg) != 0) {
        set_error("%s (and tiller_step_close: %s)", why, msg);
    } else {
        set_error("%s", why);
    }
    return -1;
}

int tiller_llama_end(tiller_llama *a, int32_t decode_result) {
    last_error[0] = '\0';
    if (a == NULL || a->step == NULL) {
        set_error("tiller_llama_end: no decode in progress");
        return -1;
    }
    tiller_step *step = a->step;
    a->step = NULL;
    if (decode_result != 0 || a->failed || a->hooked != a->n_hooks) {
        uncount(a, a->step_tokens);
    }
    if (decode_result != 0) {
        return end_failed(a, step, "tiller_llama_end: llama_decode returned %d", decode_result);
    }
    if (a->failed) {
        return end_failed(a, step, "%s", a->error);
    }
    if (a->hooked != a->n_hooks) {
        return end_failed(a, step,
                          "%zu of %zu hooked layers were found in the graph (an architecture whose "
                          "layer outputs are neither named l_out-N nor end with "
                          "blk.N.layer_output_norm?)",
                          a->hooked, a->n_hooks);
    }
    for (size_t i = 0; i < a->step_tokens; i++) {
        a->seq_prompted[a->seqs[i]] = 1;
    }
    char msg[768];
    if (close_step(a, step, msg, sizeof msg) != 0) {
        set_error("tiller_step_close: %s", msg);
        return -1;
    }
    return 0;
}

int32_t tiller_llama_decode(tiller_llama *a, struct llama_context *ctx, struct llama_batch batch) {
    if (ctx == NULL) {
        set_error("tiller_llama_decode: NULL context");
        return TILLER_LLAMA_ERROR;
    }
    if (tiller_llama_begin(a, batch, llama_n_ubatch(ctx)) != 0) {
        return TILLER_LLAMA_ERROR;
    }
    int32_t rc = llama_decode(ctx, batch);
    if (tiller_llama_end(a, rc) != 0) {
        return rc != 0 ? rc : TILLER_LLAMA_ERROR;
    }
    return 0;
}

size_t tiller_llama_stopped(const tiller_llama *a, uint64_t *ids, size_t cap) {
    if (a == NULL) {
        return 0;
    }
    size_t m = a->n_stops < a->stops_cap ? a->n_stops : a->stops_cap;
    for (size_t i = 0; i < m && i < cap; i++) {
        ids[i] = a->stops[i];
    }
    return a->n_stops;
}

size_t tiller_llama_hooked_nodes(const tiller_llama *a) { return a == NULL ? 0 : a->hooked; }
