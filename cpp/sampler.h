// The native sampler shared by sampler.cpp and generate.cpp.
#pragma once

#include "lamina.h"

namespace lamina {

class sampler_handle {
public:
    sampler_handle(int32_t n_vocab, float temperature, int32_t top_k, float top_p, float min_p, float typical_p, float repeat_penalty,
                   float frequency_penalty, float presence_penalty, int32_t penalty_last_n, uint32_t seed);
    bool greedy() const { return greedy_; }
    llama_sampler * chain() const { return chain_.get(); }

private:
    llama_sampler_ptr chain_;
    bool greedy_ = false;
};

// Index of the first largest value (what llama.cpp's greedy sampler picks), without building the
// vocab-sized candidate array the chain needs.
int32_t argmax(const float * x, int32_t n);

// Next token from the last logits of st: argmax for a greedy sampler unless use_chain, else the
// chain (which also accepts the token). Call without the GIL.
llama_token sample_token(context_state & st, sampler_handle & s, bool use_chain);

}  // namespace lamina
