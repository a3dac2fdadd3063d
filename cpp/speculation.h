// Speculative decoding of one generation (speculative.cpp, over llama.cpp's common/speculative).
#pragma once

#include <nanobind/nanobind.h>

#include "llama.h"

#include <cstdint>
#include <memory>
#include <vector>

namespace lamina {

namespace nb = nanobind;

struct context_state;
// A draft's settings (bound as _native.DraftParams; lamina.Draft takes its defaults from here): the
// most and fewest tokens a draft may propose, the draft model's least probability for a token it
// proposes, and the n-gram lookup's key length (the draft without a model).
struct draft_options {
    int32_t n_max = 16, n_min = 0;
    float p_min = 0.75f;
    int32_t ngram_n = 12;
};
class sampler_handle;
// Speculative decoding of one generation on sequence 0 of a target context, with a draft model's
// context (its own, n_seq_max 1) or, without one, n-gram lookup (llama.cpp's common/speculative).
// The engine decodes the drafts with the target's batch and samples them (engine.cpp).
class speculation {
public:
    speculation(context_state & tgt, std::shared_ptr<context_state> dft, const draft_options & o);
    ~speculation();
    // The target evaluated `prompt`: the draft context gets it too (GIL held, draft leased).
    void begin(const std::vector<llama_token> & prompt);
    // Up to n_max tokens to follow `last` (going to position held.size(); `held`: the sequence's
    // tokens before it). The draft model decodes in its own context (leased by the caller). No GIL.
    void propose(const std::vector<llama_token> & held, llama_token last, int32_t n_max, std::vector<llama_token> & out);
    // The target decoded `last` and `drafted` at `n_past` and kept the first n_acc drafts (`held`
    // its tokens now): the draft context follows it. No GIL.
    void accepted(llama_token last, llama_pos n_past, const std::vector<llama_token> & drafted, size_t n_acc,
                  const std::vector<llama_token> & held);
    void stats(nb::dict & d) const;
    const std::shared_ptr<context_state> & draft_context() const;
private:
    struct impl;
    std::unique_ptr<impl> p_;
};

}  // namespace lamina
