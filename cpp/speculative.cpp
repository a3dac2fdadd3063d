// Speculative decoding for a generation on sequence 0, built on llama.cpp's common/speculative: a
// draft (a small model with the same vocabulary, or n-gram lookup in the tokens so far) proposes
// tokens, the target decodes the last token and the draft in one batch, and the target's own
// sampler keeps the drafted tokens it would have picked itself (common_sampler_sample_and_accept_n's
// rule, as llama-speculative-simple does): greedy output is token for token the plain output.
#include "lamina.h"

#include "sampler.h"
#include "speculative.h"

namespace lamina {

struct speculation::impl {
    std::shared_ptr<context_state> dft;  // the draft model's context (null: n-gram lookup)
    common_params_speculative params;
    common_speculative_ptr spec;
    draft_options opts;
    std::unique_ptr<common_batch> dft_batch;  // the target's batch, as the draft context sees it
    int64_t n_steps = 0, n_drafted = 0, n_accepted = 0;
};

speculation::speculation(context_state & tgt, std::shared_ptr<context_state> dft, const draft_options & o)
    : p_(std::make_unique<impl>()) {
    if (o.n_max < 1 || o.n_max > 256) throw std::invalid_argument("draft n_max must be in [1, 256]");
    if (o.n_min < 0 || o.n_min > o.n_max) throw std::invalid_argument("draft n_min must be in [0, n_max]");
    if (!(o.p_min >= 0.0f && o.p_min <= 1.0f)) throw std::invalid_argument("draft p_min must be in [0, 1]");
    if (o.ngram_n < 1 || o.ngram_n > 1024) throw std::invalid_argument("ngram n must be in [1, 1024]");
    // a step keeps the drafts the target accepts and cuts the rest out of both caches: a recurrent
    // state (Mamba, RWKV, or a hybrid's recurrent layers) cannot drop tokens, and would keep them
    auto can_cut = [](const context_state & c, const char * which) {
        const llama_model * mdl = c.model->model.get();
        if (llama_model_is_recurrent(mdl) || llama_model_is_hybrid(mdl)) {
            throw std::invalid_argument(std::string("speculative decoding cuts rejected drafts out of the cache, and the ") +
                                        which + " model is recurrent or hybrid (its state cannot drop tokens)");
        }
    };
    can_cut(tgt, "target");
    if (dft) can_cut(*dft, "draft");
    p_->opts = o;
    p_->dft = std::move(dft);
    common_params_speculative & sp = p_->params;
    if (p_->dft) {
        const llama_vocab * vt = tgt.model->vocab;
        const llama_vocab * vd = p_->dft->model->vocab;
        if (llama_vocab_type(vt) != llama_vocab_type(vd) || llama_vocab_n_tokens(vt) != llama_vocab_n_tokens(vd)) {
            throw std::invalid_argument("the draft model's vocabulary differs from the target's (type or size): "
                                        "speculative decoding needs the same tokens");
        }
        if (llama_n_seq_max(p_->dft->ctx.get()) != 1) throw std::invalid_argument("the draft context needs n_seq_max=1");
        sp.types = {COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE};
        sp.draft.n_max = o.n_max;
        sp.draft.n_min = o.n_min;
        sp.draft.p_min = o.p_min;
        sp.draft.ctx_tgt = tgt.ctx.get();
        sp.draft.ctx_dft = p_->dft->ctx.get();
    } else {
        sp.types = {COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE};
        sp.ngram_simple.size_n = uint16_t(o.ngram_n);
        sp.ngram_simple.size_m = uint16_t(o.n_max);
    }
    try {
        p_->spec.reset(common_speculative_init(sp, 1));
    } catch (const std::runtime_error & e) {  // e.g. vocabularies that differ in their tokens
        throw std::invalid_argument(std::string("speculative decoding cannot start: ") + e.what());
    }
    if (!p_->spec) throw lamina_error("llama.cpp's speculative decoding did not start");
    if (p_->dft) p_->dft_batch = std::make_unique<common_batch>(p_->dft->ctx.get());
}

speculation::~speculation() = default;

// Cut a sequence back to n tokens; a cache that cannot (checked at the start) would keep rejected drafts.
static void cut(llama_context * ctx, llama_pos n) {
    if (!llama_memory_seq_rm(llama_get_memory(ctx), 0, n, -1)) {
        throw lamina_error("llama.cpp could not cut rejected draft tokens out of the cache at position " + std::to_string(n));
    }
}

void speculation::begin(const std::vector<llama_token> & prompt) {
    if (p_->dft) eval_prompt(*p_->dft, prompt);  // the draft context holds the prompt too (its own prefix reuse)
    {
        gil_release nogil;  // the adapters' lock may wait for an adapter load (lease.h: no lock waited for with the GIL)
        llama_work work;  // the draft model may decode the prompt
        std::shared_lock<std::shared_mutex> adapters(lora_registry());  // as decode_checked: a reserve reads adapters
        common_speculative_begin(p_->spec.get(), 0, prompt);
    }
}

const std::shared_ptr<context_state> & speculation::draft_context() const { return p_->dft; }

void speculation::propose(const std::vector<llama_token> & held, llama_token last, int32_t n_max,
                          std::vector<llama_token> & out) {
    impl & p = *p_;
    const llama_pos n_past = llama_pos(held.size());
    out.clear();
    n_max = std::min(n_max, p.opts.n_max);
    if (n_max > 0) {
        common_speculative_get_draft_params(p.spec.get(), 0) = {
            /* .drafting = */ true,
            /* .n_max    = */ n_max,
            /* .pos0     = */ n_past,
            /* .id_last  = */ last,
            /* .prompt   = */ &held,
            /* .result   = */ &out,
        };
        {
            llama_work work;  // the draft model decodes
            std::shared_lock<std::shared_mutex> adapters(lora_registry());
            common_speculative_draft(p.spec.get());
        }
        if (int32_t(out.size()) < p.opts.n_min) out.clear();
        if (int32_t(out.size()) > n_max) out.resize(size_t(n_max));
    }
    // the draft decoded `last` (and its proposals) in its own context: back to the target's tokens
    if (p.dft) cut(p.dft->ctx.get(), n_past);
}

void speculation::accepted(llama_token last, llama_pos n_past, const std::vector<llama_token> & drafted, size_t n_acc,
                           const std::vector<llama_token> & held) {
    impl & p = *p_;
    if (p.dft) {  // the draft context decodes the same tokens (llama.cpp's draft-simple keeps in step this way)
        p.dft_batch->clear();
        p.dft_batch->add(last, n_past, 0, drafted.empty());
        for (size_t i = 0; i < drafted.size(); ++i) p.dft_batch->add(drafted[i], n_past + 1 + llama_pos(i), 0, i + 1 == drafted.size());
        bool ok;
        {
            llama_work work;
            std::shared_lock<std::shared_mutex> adapters(lora_registry());
            ok = common_speculative_process(p.spec.get(), *p.dft_batch);
        }
        if (!ok) throw lamina_error("the draft model's decode failed: " + last_log_error());
    }
    common_speculative_accept(p.spec.get(), 0, uint16_t(n_acc));
    ++p.n_steps;
    p.n_drafted += int64_t(drafted.size());
    p.n_accepted += int64_t(n_acc);
    if (p.dft) {
        cut(p.dft->ctx.get(), n_past + 1 + llama_pos(n_acc));
        p.dft->tokens = held;
    }
}

void speculation::stats(nb::dict & d) const {
    d["n_draft_steps"] = p_->n_steps;
    d["n_drafted"] = p_->n_drafted;
    d["n_accepted"] = p_->n_accepted;
    d["acceptance"] = p_->n_drafted > 0 ? double(p_->n_accepted) / double(p_->n_drafted) : 0.0;
}

}  // namespace lamina
