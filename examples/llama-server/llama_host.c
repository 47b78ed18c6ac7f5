/*
 * llama_host: the few llama.cpp calls of tiller-llama-server that take or return structs by value
 * (model and context parameters, batches, chat messages), behind functions of pointers and
 * scalars, so that the Rust server loads them at run time without mirroring llama.h's layouts.
 * Built by build.sh into libtiller_llama_host.so, which links the adapter (tiller_llama.h),
 * llama.cpp and libtiller: the server reaches all three through this one library.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "tiller_llama.h"

static void quiet_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

/* Quiets llama.cpp's log (errors still reach stderr) and initialises its backends. */
void tls_init(void) {
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
}

/* Loads a GGUF model on the CPU; NULL when llama.cpp cannot. */
struct llama_model *tls_model_load(const char *path) {
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    return llama_model_load_from_file(path, mp);
}

/* A context for `n_seq_max` sequences sharing `n_ctx` cells, decoding up to `n_batch` tokens in
 * one micro-batch, with `adapter` attached (NULL: llama.cpp alone, the same context otherwise).
 * `cache_type` is the KV cache's ggml type (GGML_TYPE_F16 or GGML_TYPE_F32). */
struct llama_context *tls_context_new(struct llama_model *model, tiller_llama *adapter, uint32_t n_ctx,
                                      uint32_t n_batch, uint32_t n_seq_max, int32_t threads,
                                      int32_t cache_type, bool embeddings) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = n_seq_max;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    cp.type_k = (enum ggml_type)cache_type;
    cp.type_v = (enum ggml_type)cache_type;
    cp.embeddings = embeddings;
    cp.no_perf = true;
    /* As tiller_llama_attach sets it, with or without Tiller: both run the same context. */
    cp.kv_unified = true;
    if (cache_type == GGML_TYPE_F32) {
        /* f32 values through llama.cpp's plain attention, which a float64 reference matches. */
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    }
    if (adapter != NULL) {
        tiller_llama_attach(adapter, &cp);
    }
    return llama_init_from_model(model, cp);
}

/* A batch with room for `n` tokens of one sequence id each. */
struct llama_batch *tls_batch_new(int32_t n) {
    struct llama_batch *b = malloc(sizeof *b);
    if (b != NULL) {
        *b = llama_batch_init(n, 0, 1);
    }
    return b;
}

void tls_batch_free(struct llama_batch *b) {
    if (b != NULL) {
        llama_batch_free(*b);
        free(b);
    }
}

void tls_batch_clear(struct llama_batch *b) { b->n_tokens = 0; }

/* Appends a token; the caller keeps within the batch's room. */
void tls_batch_add(struct llama_batch *b, llama_token token, llama_pos pos, llama_seq_id seq,
                   bool logits) {
    int32_t i = b->n_tokens++;
    b->token[i] = token;
    b->pos[i] = pos;
    b->n_seq_id[i] = 1;
    b->seq_id[i][0] = seq;
    b->logits[i] = logits;
}

/* Decodes the batch through the adapter (NULL: llama_decode alone). Returns llama_decode's
 * result, or TILLER_LLAMA_ERROR with the message in tiller_llama_last_error(). */
int32_t tls_decode(struct llama_context *ctx, tiller_llama *adapter, const struct llama_batch *b) {
    return adapter != NULL ? tiller_llama_decode(adapter, ctx, *b) : llama_decode(ctx, *b);
}

/* Removes sequence `seq`'s cells from the KV cache. */
void tls_seq_rm(struct llama_context *ctx, llama_seq_id seq) {
    llama_memory_seq_rm(llama_get_memory(ctx), seq, -1, -1);
}

/* Clears the KV cache (embedding models decode each input alone). */
void tls_memory_clear(struct llama_context *ctx) { llama_memory_clear(llama_get_memory(ctx), true); }

/* The model's chat template (NULL when it has none). */
const char *tls_chat_template(const struct llama_model *model) {
    return llama_model_chat_template(model, NULL);
}

/* Renders `n` messages with template `tmpl` (a Jinja text llama.cpp recognises, or a built-in
 * name such as "chatml") and the assistant's prefix, into `buf` of `len` bytes. Returns the
 * rendered length (larger than `len`: call again with more room), or -1 when llama.cpp does not
 * know the template, -2 when out of memory. */
int32_t tls_chat_apply(const char *tmpl, const char *const *roles, const char *const *contents,
                       size_t n, char *buf, int32_t len) {
    struct llama_chat_message *msgs = calloc(n > 0 ? n : 1, sizeof *msgs);
    if (msgs == NULL) {
        return -2;
    }
    for (size_t i = 0; i < n; i++) {
        msgs[i].role = roles[i];
        msgs[i].content = contents[i];
    }
    int32_t r = llama_chat_apply_template(tmpl, msgs, n, true, buf, len);
    free(msgs);
    return r < 0 ? -1 : r;
}
