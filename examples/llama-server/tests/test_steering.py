"""A steered request's logprobs are the float64 reference's with the profile's edit.

Profile `steer` adds STRENGTH * W_dec[FEATURE] to the residual after layer 0 on every token of the
request (prompt and generated). The reference decoder with that edit at every position predicts
the logits of each generated position; the server's top-20 logprobs (the log-softmax of the raw
logits) must match the reference's log-softmax at relative error under 1e-4 of the logits' scale
(float32 llama.cpp against float64, as examples/llama-cpp/tests/test_generation.py), while the
unedited reference is far off, so the test sees the edit.
"""

from __future__ import annotations

import numpy as np
import reference
from conftest import FEATURE, LAYER, STRENGTH, greedy, log_softmax, top_logprobs_by_id

PROMPTS = [[1, 72, 101, 108, 108, 111, 33], [1, 87, 104, 121, 63]]
STEPS = 8
RTOL = 1e-4


def check_against_reference(answer: dict, prompt: list[int], weights, edit):
    """(error with the edit, error without it), each the largest logprob difference over the
    returned top-20 entries relative to the reference logits' largest magnitude."""
    choice = answer["choices"][0]
    generated = choice["token_ids"]
    assert answer["prompt_token_ids"] == prompt
    assert len(generated) == STEPS
    tokens = prompt + generated
    rows = list(range(len(prompt) - 1, len(tokens) - 1))  # the positions whose logits chose each token
    edits = {} if edit is None else {LAYER: edit}
    ref_logits = reference.llama_forward(weights, tokens, edits=edits)["logits"][rows]
    plain_logits = reference.llama_forward(weights, tokens)["logits"][rows]
    ref, plain = log_softmax(ref_logits), log_softmax(plain_logits)
    scale = np.abs(ref_logits).max()
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in generated]
    err = plain_err = 0.0
    for k, (tok, chosen, top) in enumerate(zip(generated, lp["token_logprobs"], lp["top_logprobs"])):
        top = top_logprobs_by_id(top)
        assert len(top) == 20
        # The 20 most likely tokens of the reference (barring a tie at the cut).
        order = np.argsort(-ref[k])
        if ref[k][order[19]] - ref[k][order[20]] > 10 * RTOL * scale:
            assert set(top) == set(order[:20].tolist()), f"token {k}"
        # Greedy picked the reference's argmax (barring a near tie).
        if ref[k][order[0]] - ref[k][order[1]] > 10 * RTOL * scale:
            assert tok == int(order[0]), f"token {k}"
        assert chosen == top[tok]
        ids = list(top)
        got = np.asarray([top[i] for i in ids])
        err = max(err, float(np.abs(got - ref[k][ids]).max() / scale))
        plain_err = max(plain_err, float(np.abs(got - plain[k][ids]).max() / scale))
    return err, plain_err


def test_steered_logprobs_equal_the_reference(steer_server, tiny, sae):
    _, weights = tiny
    _, w_dec = sae
    edit = STRENGTH * w_dec[FEATURE]
    for prompt in PROMPTS:
        answer = steer_server.complete(
            greedy(STEPS, prompt=prompt, logprobs=20, return_tokens_as_token_ids=True, tiller_profile="steer"))
        err, plain_err = check_against_reference(answer, prompt, weights, edit)
        print(f"steered, prompt of {len(prompt)}: relative error {err:.2e}, against the unedited reference {plain_err:.2e}")
        assert err < RTOL
        assert plain_err > 100 * err, "the edit does not show in the logprobs"
        t = answer["tiller"]
        assert t["profile"] == "steer" and t["steering"] == {"add-2": t["tokens"]}


def test_unsteered_logprobs_equal_the_reference(steer_server, tiny):
    _, weights = tiny
    prompt = PROMPTS[0]
    answer = steer_server.complete(greedy(STEPS, prompt=prompt, logprobs=20, return_tokens_as_token_ids=True))
    err, _ = check_against_reference(answer, prompt, weights, None)
    assert err < RTOL


PHASE_PROFILES = """
[[profile]]
name = "prompt-only"
[[profile.steer]]
name = "add-2-prompt"
dictionary = "sae"
op = "add"
feature = 2
strength = 1.5
apply_to = "prompt"

[[profile]]
name = "generated-only"
[[profile.steer]]
name = "add-2-generated"
dictionary = "sae"
op = "add"
feature = 2
strength = 1.5
apply_to = "generated"
"""


def test_prompts_prefilled_in_chunks_keep_their_phase(start_server, tmp_path, tiny, sae, token_file):
    """With `--batch 4` an 11-token prompt is prefilled in three decodes, beside another sequence
    that is generating. Every prompt token is still a prompt token for Tiller (the server gives the
    adapter the prompt's length), so a rule with `apply_to = "prompt"` edits exactly the 11 prompt
    positions and one with `apply_to = "generated"` exactly the generated ones, as the reference
    with the edit on those positions only predicts."""
    from conftest import CONFIG, paused_schedule, write_config

    sae_path, w_dec = sae
    _, weights = tiny
    cfg = write_config(tmp_path, sae_path, CONFIG + PHASE_PROFILES)
    server = start_server(cfg, parallel=2, extra=["--batch", "4", "--cache-type", "f32", "--admin-token-file", token_file])
    prompt = [1] + [3 + b for b in b"chunked!!!"]
    assert len(prompt) == 11
    edit = STRENGTH * w_dec[FEATURE]
    for profile, rule, on_prompt in [("prompt-only", "add-2-prompt", True), ("generated-only", "add-2-generated", False)]:
        # A neighbour queued first, so that the prompt's chunks share decodes with its tokens:
        # with a batch of 4, its 3 prompt tokens and the prompt's first, then its generated tokens
        # beside the next chunks.
        neighbour, answer = paused_schedule(server, [
            greedy(8, prompt=[1, 72, 105]),
            greedy(STEPS, prompt=prompt, logprobs=20, return_tokens_as_token_ids=True, tiller_profile=profile),
        ])
        assert neighbour["choices"][0]["finish_reason"] == "length"
        t = answer["tiller"]
        n = len(prompt) + STEPS - 1  # the last generated token is never decoded
        assert t["tokens"] == n
        assert t["steering"] == {rule: len(prompt) if on_prompt else n - len(prompt)}, t["steering"]
        tokens = prompt + answer["choices"][0]["token_ids"]
        positions = np.arange(len(tokens))[:, None]
        mask = positions < len(prompt) if on_prompt else positions >= len(prompt)
        per_position = np.where(mask, edit[None, :], 0.0)
        err, plain_err = check_against_reference(answer, prompt, weights, per_position)
        print(f"{profile}: relative error {err:.2e}, against the unedited reference {plain_err:.2e}")
        assert err < RTOL
        if on_prompt:
            assert plain_err > 100 * err, "the edit does not show in the logprobs"
