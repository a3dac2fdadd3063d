// The native sampler shared by sampler.cpp and generate.cpp.
#pragma once

#include "argmax.h"

#include "lamina.h"

#include <algorithm>
#include <map>
#include <optional>

namespace lamina {

// A sampler's settings (bound as _native.SamplerParams). Each field has its one default here:
// greedy (temperature 0), and llama.cpp's defaults for the rest; lamina.Sampler takes its from these.
struct sampler_options {
    float temperature = 0.0f;
    int32_t top_k = 40;
    float top_p = 0.95f, min_p = 0.05f, typical_p = 1.0f, top_n_sigma = -1.0f;
    float repeat_penalty = 1.0f, frequency_penalty = 0.0f, presence_penalty = 0.0f;
    int32_t penalty_last_n = 64;
    float dry_multiplier = 0.0f, dry_base = 1.75f;
    int32_t dry_allowed_length = 2, dry_penalty_last_n = -1;
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};
    float xtc_probability = 0.0f, xtc_threshold = 0.1f;
    float dynatemp_range = 0.0f, dynatemp_exponent = 1.0f;  // temperature +- range, by entropy
    int32_t mirostat = 0;                                   // 1, 2: mirostat v1/v2 replaces the truncation samplers
    float mirostat_tau = 5.0f, mirostat_eta = 0.1f;
    int32_t min_keep = 0;                                   // top-p, min-p, typical, XTC keep at least this many
    std::map<int32_t, float> logit_bias;
    std::optional<std::string> grammar;
    std::string grammar_root = "root";
    // What a chat template asks of generation (ctx.chat sets them from its render, as llama-server
    // passes them to its sampler):
    bool grammar_lazy = false;                          // the grammar applies from a trigger on
    std::vector<std::string> grammar_trigger_patterns;  // regexes over the text generated so far
    std::vector<int32_t> grammar_trigger_tokens;
    std::string generation_prompt;                      // the reply's start the template wrote: the budget reads it first,
    bool grammar_prefill = false;                       // and a (non-lazy) grammar too: the template's own grammar
    std::vector<int32_t> preserved_tokens;              // special tokens that appear as text (tool-call tags)
    int32_t reasoning_budget = -1;                      // tokens of thinking before the end tag is forced (-1: no limit)
    std::string reasoning_start, reasoning_message;     // thinking tags (no budget without them) and what goes before
    std::vector<std::string> reasoning_end;             // the forced end (the first of reasoning_end)
    uint32_t seed = 0;
    int32_t n_ctx = 0;  // what last_n = -1 ("the whole context") means; 0: the model's training context
};

class sampler_handle {
public:
    sampler_handle(std::shared_ptr<model_state> model, const sampler_options & o);
    bool greedy() const { return greedy_; }
    // Feed prompt tokens to the samplers that keep a history (penalties, DRY), not to the grammar:
    // as llama.cpp's completion does (common_sampler_accept(..., accept_grammar=false)).
    void accept_prompt(const llama_token * toks, size_t n);
    llama_sampler * chain() const { return chain_.get(); }
    llama_sampler * grammar() const { return grammar_.get(); }
    llama_sampler * budget() const { return budget_.get(); }
    // Whether token's text is shown although it is special (a preserved token).
    bool shown(llama_token token) const { return std::binary_search(preserved_.begin(), preserved_.end(), token); }
    // The next token from output idx of ctx, accepted by the chain (and the grammar). With a grammar,
    // llama.cpp's common_sampler order: the chain picks from the raw candidates, the grammar checks
    // only that token, and only a token it rejects makes it run over the whole vocabulary and the
    // chain pick again (a grammar over every candidate costs ~30 ms per token at a 262k vocabulary).
    llama_token sample(llama_context * ctx, int32_t idx);

private:
    std::shared_ptr<model_state> model_;  // DRY and grammar samplers point into its vocabulary
    llama_sampler_ptr chain_;
    llama_sampler_ptr grammar_;           // outside the chain: see sample()
    llama_sampler_ptr budget_;            // reasoning budget (common/reasoning-budget.h), before everything
    bool lazy_ = false;
    std::vector<llama_token> preserved_;  // sorted
    bool grammar_applies() const;         // common_sampler's grammar_should_apply
    void fill(const float * logits, llama_token_data_array & a);
    std::vector<llama_token_data> cur_;   // candidates (reused)
    bool greedy_ = false;
};

// Next token from the last logits of st: argmax for a greedy sampler unless use_chain, else the
// chain (which also accepts the token). Call without the GIL.
llama_token sample_token(context_state & st, sampler_handle & s, bool use_chain);

}  // namespace lamina
