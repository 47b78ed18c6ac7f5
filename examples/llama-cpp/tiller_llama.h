/*
 * tiller_llama: attaches Tiller to llama.cpp through its per-node eval callback (`cb_eval`).
 *
 * The adapter hooks the residual stream after chosen layers: in decoder graphs the node llama.cpp
 * names `l_out-N`; in BERT graphs, which leave it unnamed, the node found by structure (the ADD
 * whose second source is `blk.N.layer_output_norm.bias`, the end of layer N). When llama.cpp has
 * computed such a node, the adapter hands its rows to `tiller_step_hook` in place, so the edit
 * reaches every later op, and the KV cache of later layers.
 *
 * Use:
 *   struct llama_context_params cp = llama_context_default_params();
 *   tiller_llama *a = tiller_llama_new(rt, model, layers, n_layers, NULL);
 *   tiller_llama_attach(a, &cp);                  // sets cp.cb_eval and cp.cb_eval_user_data
 *   struct llama_context *ctx = llama_init_from_model(model, cp);
 *   tiller_request_begin(rt, 7, "careful", NULL); // the host's request, with its profile
 *   tiller_llama_seq_begin(a, 0, 7);              // sequence 0 of the batch is request 7
 *   tiller_llama_decode(a, ctx, batch);           // instead of llama_decode
 *   if (tiller_llama_seq_stopped(a, 0) == 1) ...  // a monitor stopped request 7: generate no more
 *   ...
 *   tiller_llama_seq_end(a, 0);
 *   tiller_request_end(rt, 7, buf, len, &needed);
 *
 * A token's phase is PROMPT in the first decode of its sequence after tiller_llama_seq_begin and
 * GENERATED afterwards; a host that prefills prompts in chunks gives the prompt's length with
 * tiller_llama_seq_prompt, and then a token's phase follows from its index in the sequence. A batch must fit in one micro-batch (n_tokens <= llama_n_ubatch): the
 * adapter opens one Tiller step per decode. Only the CPU backend is supported: a hooked node in
 * device memory is refused with a clear error (llama.cpp's other backends would need
 * ggml_backend_tensor_get/set).
 *
 * Errors: functions returning int return 0 on success and -1 on error (tiller_llama_decode returns
 * llama_decode's own result, or TILLER_LLAMA_ERROR); tiller_llama_new returns NULL.
 * tiller_llama_last_error() gives the message (per thread). An adapter belongs to one context and
 * is used from the thread that decodes on it.
 */
#ifndef TILLER_LLAMA_H
#define TILLER_LLAMA_H

#include <stddef.h>
#include <stdint.h>

#include "llama.h"
#include "tiller.h"

#ifdef __cplusplus
extern "C" {
#endif

/* tiller_llama_decode's result when the adapter (not llama.cpp) failed. */
#define TILLER_LLAMA_ERROR (-1000)

typedef struct tiller_llama tiller_llama;

/* Creates an adapter for `model` hooking the output of each layer in `layers` (0-based, each
 * below llama_model_n_layer). `hook_format` names the hook given to Tiller, with one `%d` for the
 * layer (NULL: "blk.%d"); the config's dictionaries read that hook (their `hook` key or the
 * file's own). `rt` must outlive the adapter. */
tiller_llama *tiller_llama_new(const tiller_runtime *rt, const struct llama_model *model,
                               const int32_t *layers, size_t n_layers, const char *hook_format);

/* Frees the adapter (NULL is ignored). Free the context it is attached to first. */
void tiller_llama_free(tiller_llama *a);

/* Sets `params->cb_eval` and `params->cb_eval_user_data` to the adapter's callback, and
 * `params->kv_unified` (one KV stream for all sequences, so that llama.cpp keeps a batch's tokens
 * in order; with a stream per sequence it reorders them into equal slices, which the adapter
 * refuses). */
void tiller_llama_attach(tiller_llama *a, struct llama_context_params *params);

/* The callback itself, for hosts that chain callbacks: `user_data` is the adapter. */
bool tiller_llama_eval_callback(struct ggml_tensor *t, bool ask, void *user_data);

/* Sequence `seq` now carries Tiller request `request_id` (begun by the host with
 * tiller_request_begin); its next decode is its prompt. */
int tiller_llama_seq_begin(tiller_llama *a, llama_seq_id seq, uint64_t request_id);

/* The first `n_prompt` tokens sequence `seq` decodes are its prompt (PROMPT), the rest GENERATED,
 * whichever decodes carry them: for hosts that prefill a prompt in chunks beside other sequences.
 * Call after tiller_llama_seq_begin and before the sequence's first decode. */
int tiller_llama_seq_prompt(tiller_llama *a, llama_seq_id seq, size_t n_prompt);

/* Sequence `seq` no longer carries a request (its tokens are refused until bound again). */
int tiller_llama_seq_end(tiller_llama *a, llama_seq_id seq);

/* llama_decode with Tiller attached: opens a step over the batch's tokens (each token's request
 * from its first sequence id), decodes, and closes the step. Returns llama_decode's result, or
 * TILLER_LLAMA_ERROR with the message in tiller_llama_last_error(). When a hook fails (a shape
 * the dictionary does not take, a device buffer), the decode still completes, without that
 * layer's edit, and the error is returned: llama.cpp's outputs are never from a partial graph.
 * A failed decode still closes its step: the requests a monitor stopped at the hooks that ran
 * are in tiller_llama_stopped and their sequences stopped, as after a decode that succeeded. */
int32_t tiller_llama_decode(tiller_llama *a, struct llama_context *ctx, struct llama_batch batch);

/* tiller_llama_decode in two halves, for hosts that call llama_decode themselves (the Python
 * adapter, through llama-cpp-python): tiller_llama_begin opens the step for `batch` (`n_ubatch`:
 * llama_n_ubatch of the context), the host calls llama_decode, then tiller_llama_end(a, its
 * result) closes the step. Both return 0 or -1; after a begin that succeeded, always call end. */
int tiller_llama_begin(tiller_llama *a, struct llama_batch batch, uint32_t n_ubatch);
int tiller_llama_end(tiller_llama *a, int32_t decode_result);

/* Ids of requests a monitor asked to stop during the last decode (one that failed included): up
 * to `cap` written to `ids`; returns their number (which may exceed `cap`). Every sequence
 * carrying such a request is then stopped (tiller_llama_seq_stopped): the host samples nothing
 * more from its logits, drops it from later batches (a batch with one of its tokens is refused)
 * and ends it with tiller_llama_seq_end; the other sequences of the batch go on. */
size_t tiller_llama_stopped(const tiller_llama *a, uint64_t *ids, size_t cap);

/* 1 when a monitor stopped the request sequence `seq` carries (during any decode since
 * tiller_llama_seq_begin), 0 when not, -1 when the sequence carries no request. */
int tiller_llama_seq_stopped(const tiller_llama *a, llama_seq_id seq);

/* Nodes hooked during the last decode (one per hooked layer when all went well). */
size_t tiller_llama_hooked_nodes(const tiller_llama *a);

/* The last error on this thread ("" when none). */
const char *tiller_llama_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* TILLER_LLAMA_H */
