// Several sequences generated together: every prompt goes into shared batches (one sequence id
// each), then each step decodes one token for every sequence still running, in a single
// llama_decode. For callers that serve many prompts: throughput grows with the batch while a
// step costs little more than one sequence's on memory-bound hardware.
#include "lamina.h"

#include "sampler.h"

namespace lamina {
namespace {

using tokens_in = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

struct seq_state {
    std::vector<llama_token> prompt, generated;
    sampler_handle * sampler = nullptr;
    llama_pos pos = 0;        // next position to decode
    llama_token pending = -1; // sampled, not yet decoded
    int32_t out = -1;         // index of this sequence's logits in the last batch
    std::string finish;       // empty while running
};

llama_token pick(context_state & st, seq_state & s) {
    if (s.sampler->greedy()) {
        return argmax(llama_get_logits_ith(st.ctx.get(), s.out), st.model->n_vocab);
    }
    return llama_sampler_sample(s.sampler->chain(), st.ctx.get(), s.out);
}

// After a decode that produced logits for s: sample, then record why it stops, if it does.
void advance(context_state & st, seq_state & s, int32_t max_tokens, bool ignore_eos, llama_pos n_ctx_seq) {
    llama_token t = pick(st, s);
    if (!ignore_eos && llama_vocab_is_eog(st.model->vocab, t)) {
        s.finish = "stop";
        return;
    }
    s.generated.push_back(t);
    s.pending = t;
    if (int32_t(s.generated.size()) >= max_tokens || s.pos + 1 > n_ctx_seq) {
        s.finish = "length";
    }
}

nb::list generate_batch(nb::handle ctx, std::vector<tokens_in> prompts, std::vector<sampler_handle *> samplers,
                        int32_t max_tokens, bool ignore_eos) {
    context_lease lease = context_leased(ctx);
    context_state & st = *lease;
    begin_operation(st);
    llama_context * c = st.ctx.get();
    const size_t n = prompts.size();
    if (n == 0) throw std::invalid_argument("no prompts");
    if (samplers.size() != n) throw std::invalid_argument("one sampler per prompt");
    if (n > llama_n_seq_max(c)) {
        throw std::invalid_argument(std::to_string(n) + " prompts need a context with n_seq_max >= " +
                                    std::to_string(n) + " (this one has " + std::to_string(llama_n_seq_max(c)) + ")");
    }
    if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
    if (st.embeddings) throw std::invalid_argument("generation needs a context without embeddings");
    const llama_pos n_ctx_seq = llama_pos(llama_n_ctx_seq(c));
    std::vector<seq_state> seqs(n);
    for (size_t i = 0; i < n; ++i) {
        if (samplers[i] == nullptr) throw std::invalid_argument("sampler " + std::to_string(i) + " is None");
        seqs[i].prompt.assign(prompts[i].data(), prompts[i].data() + prompts[i].shape(0));
        check_tokens(*st.model, seqs[i].prompt.data(), seqs[i].prompt.size());
        try {
            check_prompt_fits(st, seqs[i].prompt.size());
        } catch (const std::invalid_argument & e) {
            throw std::invalid_argument("prompt " + std::to_string(i) + ": " + e.what() +
                                        " (each of n_seq_max sequences gets n_ctx / n_seq_max tokens unless the KV cache is unified)");
        }
        seqs[i].sampler = samplers[i];
        samplers[i]->accept_prompt(seqs[i].prompt.data(), seqs[i].prompt.size());  // as generate() does
    }
    // the sequences start empty; sequence 0's token mirror (prefix reuse) follows what it holds
    llama_memory_t mem = llama_get_memory(c);
    for (size_t i = 0; i < n; ++i) llama_memory_seq_rm(mem, llama_seq_id(i), -1, -1);
    st.tokens.clear();

    const int32_t n_batch = int32_t(llama_n_batch(c));
    llama_batch b = llama_batch_init(std::max<int32_t>(n_batch, int32_t(n)), 0, 1);
    struct batch_guard { llama_batch & b; ~batch_guard() { llama_batch_free(b); } } guard{b};

    int64_t t0 = llama_time_us();
    // prompts, packed into batches of n_batch tokens; a sequence samples its first token right
    // after the batch that holds its last prompt token (later batches overwrite the logits)
    {
        size_t i = 0, k = 0;
        while (i < n) {
            b.n_tokens = 0;
            std::vector<size_t> ended;
            int32_t n_out = 0;
            while (i < n && b.n_tokens < n_batch) {
                seq_state & s = seqs[i];
                bool last = k + 1 == s.prompt.size();
                int32_t at = batch_add(b, s.prompt[k], llama_pos(k), llama_seq_id(i), last);
                if (last) {
                    s.out = at;
                    s.pos = llama_pos(k + 1);
                    ended.push_back(i);
                    ++n_out;
                    ++i;
                    k = 0;
                } else {
                    ++k;
                }
            }
            decode_batch(st, b, n_out);
            for (size_t e : ended) advance(st, seqs[e], max_tokens, ignore_eos, n_ctx_seq);
        }
    }
    for (llama_token t : seqs[0].prompt) st.tokens.push_back(t);
    int64_t t1 = llama_time_us();
    // one token for every running sequence per step (n_seq_max <= n_batch is checked when the
    // context is made, and decode_checked refuses a wider batch)
    while (true) {
        b.n_tokens = 0;
        for (size_t i = 0; i < n; ++i) {
            seq_state & s = seqs[i];
            if (!s.finish.empty()) continue;
            s.out = batch_add(b, s.pending, s.pos, llama_seq_id(i), true);
        }
        if (b.n_tokens == 0) break;
        decode_batch(st, b, b.n_tokens);
        for (size_t i = 0; i < n; ++i) {
            seq_state & s = seqs[i];
            if (!s.finish.empty()) continue;
            ++s.pos;
            if (i == 0) st.tokens.push_back(s.pending);
            advance(st, s, max_tokens, ignore_eos, n_ctx_seq);
        }
    }
    int64_t t2 = llama_time_us();
    nb::list out;
    for (size_t i = 0; i < n; ++i) {
        nb::dict d;
        auto * heap = new std::vector<int32_t>(seqs[i].generated.begin(), seqs[i].generated.end());
        nb::capsule owner(heap, [](void * p) noexcept { delete static_cast<std::vector<int32_t> *>(p); });
        d["tokens"] = nb::ndarray<nb::numpy, int32_t, nb::ndim<1>>(heap->data(), {heap->size()}, owner);
        d["finish_reason"] = seqs[i].finish;
        std::string text;  // the pieces generate() would yield, joined: the same text for the same tokens
        for (llama_token t : seqs[i].generated) append_piece(*st.model, t, false, text);
        PyObject * o = PyUnicode_DecodeUTF8(text.data(), Py_ssize_t(text.size()), "replace");
        if (o == nullptr) throw nb::python_error();
        d["text"] = nb::steal<nb::str>(o);
        d["n_prompt"] = seqs[i].prompt.size();
        d["t_prompt_us"] = t1 - t0;
        d["t_gen_us"] = t2 - t1;
        out.append(d);
    }
    return out;
}

}  // namespace

void init_batch(nb::module_ & m) {
    m.def("generate_batch", &generate_batch, nb::arg("ctx"), nb::arg("prompts"), nb::arg("samplers"),
          nb::arg("max_tokens"), nb::arg("ignore_eos") = false,
          R"(Generate for several prompts at once: prompt i runs as sequence i (the context needs
n_seq_max >= len(prompts)); each step decodes one token of every running sequence in one batch.
Sequences 0..n-1 are cleared first. Returns, per prompt, tokens, text (the pieces joined, as
generate() yields them), finish_reason and timings.)");
}

}  // namespace lamina
