// Sampler: a llama.cpp sampler chain built from plain settings.
#include "lamina.h"

#include "sampler.h"

namespace lamina {

sampler_handle::sampler_handle(int32_t n_vocab, float temperature, int32_t top_k, float top_p, float min_p, float typical_p,
                               float repeat_penalty, float frequency_penalty, float presence_penalty,
                               int32_t penalty_last_n, uint32_t seed) {
    if (n_vocab < 1) throw std::invalid_argument("n_vocab must be >= 1");
    if (!(temperature >= 0.0f)) throw std::invalid_argument("temperature must be >= 0");
    if (top_k < 0) throw std::invalid_argument("top_k must be >= 0 (0 disables it)");
    if (!(top_p > 0.0f && top_p <= 1.0f)) throw std::invalid_argument("top_p must be in (0, 1]");
    if (!(min_p >= 0.0f && min_p <= 1.0f)) throw std::invalid_argument("min_p must be in [0, 1]");
    if (!(typical_p > 0.0f && typical_p <= 1.0f)) throw std::invalid_argument("typical_p must be in (0, 1]");
    if (!(repeat_penalty > 0.0f)) throw std::invalid_argument("repeat_penalty must be > 0");
    if (penalty_last_n < -1) throw std::invalid_argument("penalty_last_n must be >= -1");

    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    chain_.reset(llama_sampler_chain_init(cp));
    llama_sampler * c = chain_.get();
    bool penalties = repeat_penalty != 1.0f || frequency_penalty != 0.0f || presence_penalty != 0.0f;
    if (penalties && penalty_last_n != 0) {
        llama_sampler_chain_add(c, llama_sampler_init_penalties(n_vocab, penalty_last_n, repeat_penalty, frequency_penalty,
                                                                presence_penalty));
    }
    if (temperature == 0.0f) {
        greedy_ = !penalties;  // penalties change the argmax: then the chain must run
        llama_sampler_chain_add(c, llama_sampler_init_greedy());
        return;
    }
    if (top_k > 0) llama_sampler_chain_add(c, llama_sampler_init_top_k(top_k));
    if (typical_p < 1.0f) llama_sampler_chain_add(c, llama_sampler_init_typical(typical_p, 1));
    if (top_p < 1.0f) llama_sampler_chain_add(c, llama_sampler_init_top_p(top_p, 1));
    if (min_p > 0.0f) llama_sampler_chain_add(c, llama_sampler_init_min_p(min_p, 1));
    llama_sampler_chain_add(c, llama_sampler_init_temp(temperature));
    llama_sampler_chain_add(c, llama_sampler_init_dist(seed));
}

void init_sampler(nb::module_ & m) {
    nb::class_<sampler_handle>(m, "Sampler", "A llama.cpp sampler chain (owns llama_sampler).")
        .def(nb::init<int32_t, float, int32_t, float, float, float, float, float, float, int32_t, uint32_t>(),
             nb::arg("n_vocab"), nb::arg("temperature") = 0.0f, nb::arg("top_k") = 0, nb::arg("top_p") = 1.0f, nb::arg("min_p") = 0.0f,
             nb::arg("typical_p") = 1.0f, nb::arg("repeat_penalty") = 1.0f, nb::arg("frequency_penalty") = 0.0f,
             nb::arg("presence_penalty") = 0.0f, nb::arg("penalty_last_n") = 64, nb::arg("seed") = 0,
             R"(Build the chain: penalties, top-k, typical, top-p, min-p, temperature, seeded draw.
temperature 0 means greedy (argmax).)")
        .def_prop_ro("greedy", &sampler_handle::greedy, "True when the chain is a plain argmax.")
        .def("describe", [](const sampler_handle & s) {
            std::vector<std::string> names;
            for (int32_t i = 0; i < llama_sampler_chain_n(s.chain()); ++i) {
                names.emplace_back(llama_sampler_name(llama_sampler_chain_get(s.chain(), i)));
            }
            return names;
        }, "Names of the samplers in the chain, in order.")
        .def("sample", [](sampler_handle & s, nb::handle ctx, bool use_chain) {
            auto st = context_shared(ctx);
            if (st->last_outputs == 0) throw lamina_error("no logits: decode with logits first");
            nb::gil_scoped_release nogil;
            return sample_token(*st, s, use_chain);
        }, nb::arg("ctx"), nb::arg("use_chain") = false,
        "Sample from the context's last logits (use_chain forces llama.cpp's chain even for greedy).");
}

}  // namespace lamina
