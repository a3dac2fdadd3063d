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
class speculation {
public:
    speculation(context_state & tgt, std::shared_ptr<context_state> dft, const draft_options & o);
    ~speculation();
    // The target evaluated `prompt`: the draft context gets it too (GIL held, draft leased).
    void begin(const std::vector<llama_token> & prompt);
    // Decode `last` (not yet decoded, at st.tokens.size()) and a draft of at most n_draft_max tokens
    // in one batch; ids gets the target sampler's picks: the drafts it kept, then its own token (not
    // decoded). The caches keep `last` and the kept drafts. Returns llama_decode's status (no GIL).
    int step(context_state & st, sampler_handle & s, llama_token last, int32_t n_draft_max, std::vector<llama_token> & ids);
    // Cut both caches and token lists back to n_tokens (a generation that ended inside a step).
    void truncate(context_state & st, size_t n_tokens);
    void stats(nb::dict & d) const;
    const std::shared_ptr<context_state> & draft_context() const;
private:
    struct impl;
    std::unique_ptr<impl> p_;
};

}  // namespace lamina
