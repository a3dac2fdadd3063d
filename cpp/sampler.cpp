// Sampler: a llama.cpp sampler chain built from plain settings.
#include "sampler.h"

#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <regex>

#include "common.h"
#include "json-schema-to-grammar.h"
#include "reasoning-budget.h"

namespace lamina {

llama_token sample_token(context_state & st, sampler_handle & s, bool use_chain) {
    if (s.greedy() && !use_chain) {
        const float * logits = llama_get_logits_ith(st.ctx.get(), -1);
        return argmax(logits, st.model->n_vocab);
    }
    return s.sample(st.ctx.get(), -1);
}
namespace {

void require(bool ok, const std::string & msg) {
    if (!ok) throw std::invalid_argument(msg);
}

void add(llama_sampler * chain, llama_sampler * s, const char * what) {
    if (s == nullptr) {
        std::string why = last_log_error();
        throw std::invalid_argument(std::string("invalid ") + what + (why.empty() ? "" : ": " + why));
    }
    llama_sampler_chain_add(chain, s);
}

}  // namespace

sampler_handle::sampler_handle(std::shared_ptr<model_state> model, const sampler_options & o) : model_(std::move(model)) {
    const int32_t n_vocab = model_->n_vocab;
    // llama.cpp's samplers take -1 as 0 (disabled); -1 means the whole context here, as in llama.cpp's CLI
    const int32_t n_ctx = o.n_ctx > 0 ? o.n_ctx : llama_model_n_ctx_train(model_->model.get());
    const int32_t penalty_last_n = o.penalty_last_n == -1 ? n_ctx : o.penalty_last_n;
    const int32_t dry_last_n = o.dry_penalty_last_n == -1 ? n_ctx : o.dry_penalty_last_n;
    require(std::isfinite(o.temperature) && o.temperature >= 0.0f, "temperature must be >= 0");
    require(o.top_k >= 0, "top_k must be >= 0 (0 disables it)");
    require(o.top_p > 0.0f && o.top_p <= 1.0f, "top_p must be in (0, 1]");
    require(o.min_p >= 0.0f && o.min_p <= 1.0f, "min_p must be in [0, 1]");
    require(o.typical_p > 0.0f && o.typical_p <= 1.0f, "typical_p must be in (0, 1]");
    require(std::isfinite(o.repeat_penalty) && o.repeat_penalty > 0.0f, "repeat_penalty must be > 0");
    require(std::isfinite(o.frequency_penalty) && std::isfinite(o.presence_penalty), "penalties must be finite");
    require(o.penalty_last_n >= -1, "penalty_last_n must be >= -1 (-1: the whole context)");
    require(std::isfinite(o.dry_multiplier) && o.dry_multiplier >= 0.0f, "dry_multiplier must be >= 0");
    require(o.dry_base >= 1.0f, "dry_base must be >= 1");
    require(o.dry_allowed_length >= 0 && o.dry_penalty_last_n >= -1, "dry lengths must be >= 0 (last_n >= -1)");
    require(o.xtc_probability >= 0.0f && o.xtc_probability <= 1.0f, "xtc_probability must be in [0, 1]");
    require(o.xtc_threshold >= 0.0f && o.xtc_threshold <= 1.0f, "xtc_threshold must be in [0, 1]");
    require(std::isfinite(o.dynatemp_range) && o.dynatemp_range >= 0.0f, "dynatemp_range must be >= 0");
    require(std::isfinite(o.dynatemp_exponent) && o.dynatemp_exponent > 0.0f, "dynatemp_exponent must be > 0");
    require(o.mirostat >= 0 && o.mirostat <= 2, "mirostat must be 0 (off), 1 or 2");
    require(std::isfinite(o.mirostat_tau) && o.mirostat_tau > 0.0f, "mirostat_tau must be > 0");
    require(std::isfinite(o.mirostat_eta) && o.mirostat_eta > 0.0f, "mirostat_eta must be > 0");
    require(o.min_keep >= 0, "min_keep must be >= 0");
    for (const auto & [tok, bias] : o.logit_bias) {
        if (tok < 0 || tok >= n_vocab) {
            throw std::out_of_range("logit_bias token " + std::to_string(tok) + " is out of range [0, " +
                                    std::to_string(n_vocab) + ")");
        }
        require(!std::isnan(bias), "logit_bias values must not be NaN");
    }

    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_.reset(llama_sampler_chain_init(cp));
    llama_sampler * c = chain_.get();
    const llama_vocab * vocab = model_->vocab;

    clear_last_log_error();
    bool shaped = false;  // anything that can change the argmax of the raw logits
    auto tokens = [&](const std::string & text, const char * what) {
        std::vector<llama_token> t;
        try {
            t = common_tokenize(vocab, text, false, true);
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string(what) + ": " + e.what());
        }
        return t;
    };
    for (int32_t t : o.grammar_trigger_tokens) require(t >= 0 && t < n_vocab, "grammar trigger token out of range");
    for (int32_t t : o.preserved_tokens) require(t >= 0 && t < n_vocab, "preserved token out of range");
    preserved_.assign(o.preserved_tokens.begin(), o.preserved_tokens.end());
    std::sort(preserved_.begin(), preserved_.end());
    lazy_ = o.grammar_lazy;
    if (o.grammar) {
        if (lazy_) {
            require(!o.grammar_trigger_patterns.empty() || !o.grammar_trigger_tokens.empty(),
                    "a lazy grammar needs a trigger (a pattern or a token)");
            for (const std::string & p : o.grammar_trigger_patterns) {  // llama.cpp's throw would leak its sampler
                try {
                    std::regex check(p);
                } catch (const std::regex_error & e) {
                    throw std::invalid_argument("grammar trigger pattern " + p + " is not a regex: " + e.what());
                }
            }
            std::vector<const char *> patterns;
            for (const std::string & p : o.grammar_trigger_patterns) patterns.push_back(p.c_str());
            grammar_.reset(llama_sampler_init_grammar_lazy_patterns(vocab, o.grammar->c_str(), o.grammar_root.c_str(),
                                                                    patterns.data(), patterns.size(),
                                                                    o.grammar_trigger_tokens.data(),
                                                                    o.grammar_trigger_tokens.size()));
        } else {
            grammar_.reset(llama_sampler_init_grammar(vocab, o.grammar->c_str(), o.grammar_root.c_str()));
        }
        if (!grammar_) {
            std::string why = last_log_error();
            throw std::invalid_argument(std::string("invalid grammar") + (why.empty() ? "" : ": " + why));
        }
        shaped = true;
    } else {
        require(!lazy_, "grammar_lazy without a grammar");
    }
    // As common_sampler_init: the reply's start the template wrote goes through the template's
    // grammar (a lazy one waits for its trigger instead; a user's grammar reads the reply only) and
    // the reasoning budget (a prompt ending in <think> has begun thinking).
    std::vector<llama_token> prefill;
    if (!o.generation_prompt.empty()) {
        const std::vector<llama_token> t = tokens(o.generation_prompt, "generation_prompt");
        for (size_t i = 0; i < t.size(); ++i) {
            const std::string piece = common_token_to_piece(vocab, t[i], true);
            // some tokenizers put a space before the first special token
            if (i == 0 && !piece.empty() && std::isspace((unsigned char)piece[0]) &&
                !std::isspace((unsigned char)o.generation_prompt[0])) {
                continue;
            }
            prefill.push_back(t[i]);
        }
    }
    if (grammar_ && !lazy_ && o.grammar_prefill) {
        for (llama_token t : prefill) {
            // llama.cpp aborts on an end-of-generation token a grammar does not expect
            require(!llama_vocab_is_eog(vocab, t), "the reply's start the template wrote ends the generation: "
                                                   "the grammar cannot read it");
            try {
                llama_sampler_accept(grammar_.get(), t);
            } catch (const std::exception & e) {
                throw std::invalid_argument(std::string("the grammar does not accept the reply's start: ") + e.what());
            }
        }
    }
    require(o.reasoning_budget >= -1, "reasoning_budget must be >= 0 (-1: no limit)");
    std::vector<std::vector<llama_token>> ends;
    for (const std::string & e : o.reasoning_end) {
        if (!e.empty()) ends.push_back(tokens(e, "reasoning_end"));
    }
    if (!o.reasoning_start.empty() && !ends.empty() && (lazy_ || o.reasoning_budget >= 0)) {
        std::vector<llama_token> forced = ends.front();
        if (!o.reasoning_message.empty()) {
            const std::vector<llama_token> m = tokens(o.reasoning_message, "reasoning_message");
            forced.insert(forced.begin(), m.begin(), m.end());
        }
        budget_.reset(common_reasoning_budget_init(vocab, {tokens(o.reasoning_start, "reasoning_start")}, ends, forced,
                                                   o.reasoning_budget < 0 ? INT32_MAX : o.reasoning_budget));
        if (!budget_) throw std::invalid_argument("invalid reasoning budget");
        for (llama_token t : prefill) llama_sampler_accept(budget_.get(), t);
        shaped = true;
    } else {
        require(o.reasoning_budget < 0 || (!o.reasoning_start.empty() && !ends.empty()),
                "reasoning_budget needs thinking tags: reasoning_start and reasoning_end (this template has none)");
    }
    // the user's biases, and the model's suppressed tokens (tokenizer.ggml.suppress_tokens) at -inf, as
    // common_sampler_init merges them
    int32_t n_suppress = 0;
    const llama_token * suppress = llama_vocab_get_suppress_tokens(vocab, &n_suppress);
    if (!o.logit_bias.empty() || n_suppress > 0) {
        std::vector<llama_logit_bias> lb;
        for (const auto & [tok, bias] : o.logit_bias) lb.push_back({tok, bias});
        for (int32_t i = 0; i < n_suppress; ++i) lb.push_back({suppress[i], -INFINITY});
        add(c, llama_sampler_init_logit_bias(n_vocab, int32_t(lb.size()), lb.data()), "logit_bias");
        shaped = true;
    }
    if (o.mirostat != 0) {  // as llama.cpp's common_sampler: no penalties, DRY or truncation with mirostat
        if (o.temperature == 0.0f) {
            greedy_ = !shaped;
            llama_sampler_chain_add(c, llama_sampler_init_greedy());
            return;
        }
        add(c, llama_sampler_init_temp(o.temperature), "temperature");
        add(c, o.mirostat == 1 ? llama_sampler_init_mirostat(n_vocab, o.seed, o.mirostat_tau, o.mirostat_eta, 100)
                               : llama_sampler_init_mirostat_v2(o.seed, o.mirostat_tau, o.mirostat_eta), "mirostat");
        return;
    }
    bool penalties = o.repeat_penalty != 1.0f || o.frequency_penalty != 0.0f || o.presence_penalty != 0.0f;
    if (penalties && penalty_last_n != 0) {
        add(c, llama_sampler_init_penalties(n_vocab, penalty_last_n, o.repeat_penalty, o.frequency_penalty,
                                            o.presence_penalty), "penalties");
        shaped = true;
    }
    if (o.dry_multiplier > 0.0f && dry_last_n != 0) {
        std::vector<const char *> br;
        for (const auto & s : o.dry_sequence_breakers) br.push_back(s.c_str());
        add(c, llama_sampler_init_dry(vocab, o.dry_multiplier, o.dry_base, o.dry_allowed_length, dry_last_n,
                                      br.data(), br.size()), "dry");
        shaped = true;
    }
    if (o.temperature == 0.0f) {
        greedy_ = !shaped;  // only then is the chain's answer the argmax of the raw logits
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
        return;
    }
    const size_t keep = size_t(o.min_keep);
    if (o.top_n_sigma > 0.0f) add(c, llama_sampler_init_top_n_sigma(o.top_n_sigma), "top_n_sigma");
    if (o.top_k > 0) add(c, llama_sampler_init_top_k(o.top_k), "top_k");
    if (o.typical_p < 1.0f) add(c, llama_sampler_init_typical(o.typical_p, keep), "typical_p");
    if (o.top_p < 1.0f) add(c, llama_sampler_init_top_p(o.top_p, keep), "top_p");
    if (o.min_p > 0.0f) add(c, llama_sampler_init_min_p(o.min_p, keep), "min_p");
    if (o.xtc_probability > 0.0f) {
        add(c, llama_sampler_init_xtc(o.xtc_probability, o.xtc_threshold, keep, o.seed), "xtc");
    }
    add(c, o.dynatemp_range > 0.0f ? llama_sampler_init_temp_ext(o.temperature, o.dynatemp_range, o.dynatemp_exponent)
                                   : llama_sampler_init_temp(o.temperature), "temperature");
    add(c, llama_sampler_init_dist(o.seed), "dist");
}

void sampler_handle::fill(const float * logits, llama_token_data_array & a) {
    const int32_t n_vocab = model_->n_vocab;
    cur_.resize(size_t(n_vocab));
    for (int32_t i = 0; i < n_vocab; ++i) cur_[size_t(i)] = llama_token_data{i, logits[i], 0.0f};
    a = llama_token_data_array{cur_.data(), cur_.size(), -1, false};
    if (budget_) llama_sampler_apply(budget_.get(), &a);  // forcing the end tag: every other token -inf
}

bool sampler_handle::grammar_applies() const {
    if (!grammar_) return false;
    if (!budget_ || !lazy_) return true;
    // a lazy (tool-call) grammar waits while the model thinks
    const common_reasoning_budget_state s = common_reasoning_budget_get_state(budget_.get());
    return s == REASONING_BUDGET_IDLE || s == REASONING_BUDGET_DONE;
}

llama_token sampler_handle::sample(llama_context * ctx, int32_t idx) {
    if (!grammar_ && !budget_) return llama_sampler_sample(chain_.get(), ctx, idx);
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == nullptr) throw lamina_error("no logits for output " + std::to_string(idx));
    llama_token_data_array all;
    fill(logits, all);
    llama_sampler_apply(chain_.get(), &all);
    llama_token id = all.data[all.selected >= 0 ? all.selected : 0].id;
    const bool use_grammar = grammar_applies();
    if (use_grammar) {
        llama_token_data one{id, 1.0f, 0.0f};
        llama_token_data_array single{&one, 1, -1, false};
        llama_sampler_apply(grammar_.get(), &single);
        if (!(one.logit > -INFINITY)) {  // rejected: the grammar over every candidate, then the chain again
            fill(logits, all);
            llama_sampler_apply(grammar_.get(), &all);
            llama_sampler_apply(chain_.get(), &all);
            const llama_token_data & pick = all.data[all.selected >= 0 ? all.selected : 0];
            // every token refused (a grammar that needs text this vocabulary cannot write): llama.cpp
            // would abort accepting an end-of-generation token here
            if (!(pick.logit > -INFINITY)) throw lamina_error("the grammar allows no token of this model here");
            id = pick.id;
        }
    }
    // accepted as common_sampler_accept: the budget first; a lazy grammar that waited for the end
    // of thinking reads the end tag that ended it (it may be a trigger)
    if (budget_) {
        llama_sampler_accept(budget_.get(), id);
        if (grammar_ && !use_grammar && common_reasoning_budget_get_state(budget_.get()) == REASONING_BUDGET_DONE) {
            if (const std::vector<llama_token> * end = common_reasoning_budget_get_end_match(budget_.get())) {
                for (llama_token t : *end) {
                    if (!llama_vocab_is_eog(model_->vocab, t)) llama_sampler_accept(grammar_.get(), t);
                }
            }
        }
    }
    if (use_grammar) llama_sampler_accept(grammar_.get(), id);
    llama_sampler_accept(chain_.get(), id);
    return id;
}

void sampler_handle::accept_prompt(const llama_token * toks, size_t n) {
    if (greedy_) return;  // a plain argmax has no history
    llama_sampler * c = chain_.get();
    for (int32_t i = 0; i < llama_sampler_chain_n(c); ++i) {
        llama_sampler * s = llama_sampler_chain_get(c, i);
        if (std::strcmp(llama_sampler_name(s), "grammar") == 0) continue;
        for (size_t k = 0; k < n; ++k) llama_sampler_accept(s, toks[k]);
    }
}

void init_sampler(nb::module_ & m) {
    {
        using Params = sampler_options;
        nb::class_<sampler_options>(m, "SamplerParams", "A sampler's settings; each field's default is lamina.Sampler's.")
            .def(nb::init<>())
            LAMINA_RW(temperature) LAMINA_RW(top_k) LAMINA_RW(top_p) LAMINA_RW(min_p) LAMINA_RW(typical_p)
            LAMINA_RW(top_n_sigma) LAMINA_RW(repeat_penalty) LAMINA_RW(frequency_penalty) LAMINA_RW(presence_penalty)
            LAMINA_RW(penalty_last_n) LAMINA_RW(dry_multiplier) LAMINA_RW(dry_base) LAMINA_RW(dry_allowed_length)
            LAMINA_RW(dry_penalty_last_n) LAMINA_RW(dry_sequence_breakers) LAMINA_RW(xtc_probability)
            LAMINA_RW(xtc_threshold) LAMINA_RW(dynatemp_range) LAMINA_RW(dynatemp_exponent) LAMINA_RW(mirostat)
            LAMINA_RW(mirostat_tau) LAMINA_RW(mirostat_eta) LAMINA_RW(min_keep) LAMINA_RW(logit_bias) LAMINA_RW(grammar)
            LAMINA_RW(grammar_root) LAMINA_RW(grammar_lazy) LAMINA_RW(grammar_trigger_patterns)
            LAMINA_RW(grammar_trigger_tokens) LAMINA_RW(generation_prompt) LAMINA_RW(grammar_prefill) LAMINA_RW(preserved_tokens)
            LAMINA_RW(reasoning_budget) LAMINA_RW(reasoning_start) LAMINA_RW(reasoning_message) LAMINA_RW(reasoning_end)
            LAMINA_RW(seed) LAMINA_RW(n_ctx);
    }
    nb::class_<sampler_handle>(m, "Sampler", "A llama.cpp sampler chain (owns llama_sampler).")
        .def("__init__", [](sampler_handle * self, nb::handle model, const sampler_options & o) {
            new (self) sampler_handle(model_shared(model), o);
        }, nb::arg("model"), nb::arg("params") = sampler_options{},
        R"(Build the chain: grammar, logit bias, penalties, DRY, top-n-sigma, top-k, typical, top-p,
min-p, XTC, temperature (dynamic with dynatemp_range), seeded draw; with mirostat 1/2 (as
llama.cpp): grammar, logit bias, temperature, mirostat. temperature 0 ends with greedy (argmax).)")
        .def_prop_ro("greedy", &sampler_handle::greedy, "True when the chain is a plain argmax of the logits.")
        .def("describe", [](const sampler_handle & s) {
            std::vector<std::string> names;
            if (s.budget() != nullptr) names.emplace_back(llama_sampler_name(s.budget()));
            if (s.grammar() != nullptr) names.emplace_back(llama_sampler_name(s.grammar()));
            for (int32_t i = 0; i < llama_sampler_chain_n(s.chain()); ++i) {
                names.emplace_back(llama_sampler_name(llama_sampler_chain_get(s.chain(), i)));
            }
            return names;
        }, "Names of the samplers in the chain, in order.")
        .def("sample", [](sampler_handle & s, nb::handle ctx, bool use_chain) {
            auto st = context_leased(ctx);
            if (st->last_outputs == 0) throw lamina_error("no logits: decode with logits first");
            gil_release nogil;
            return sample_token(*st, s, use_chain);
        }, nb::arg("ctx"), nb::arg("use_chain") = false,
        "Sample from the context's last logits (use_chain forces llama.cpp's chain even for greedy).");

    m.def("json_schema_to_grammar", [](const std::string & schema) {
        // llama.cpp's converter recurses once per nesting level: bound it before it can overflow the stack
        constexpr int max_depth = 64;
        if (bracket_depth().feed(schema) > max_depth) {
            throw std::invalid_argument("the schema nests more than " + std::to_string(max_depth) + " levels deep");
        }
        common_json json;
        try {
            json = common_json::parse(schema);
        } catch (const std::exception & e) {
            throw std::invalid_argument(std::string("not valid JSON: ") + e.what());
        }
        try {
            return json_schema_to_grammar(json, true);
        } catch (const std::exception & e) {  // the converter names the part it could not convert
            throw std::invalid_argument(e.what());
        }
    }, nb::arg("schema"), "GBNF grammar for a JSON schema (text), by llama.cpp's own converter.");
}

}  // namespace lamina
