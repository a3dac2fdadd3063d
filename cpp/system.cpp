// What was built and what is loaded: llama.cpp version, backends, CPU features.
#include "lamina.h"

#include "ggml-backend.h"

#include <nanobind/stl/pair.h>

namespace lamina {
namespace {

nb::dict backend_features(ggml_backend_reg_t reg) {
    nb::dict feats;
    auto fn = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    if (fn == nullptr) {
        return feats;
    }
    for (ggml_backend_feature * f = fn(reg); f != nullptr && f->name != nullptr; ++f) {
        feats[f->name] = f->value ? f->value : "";
    }
    return feats;
}

}  // namespace

void init_system(nb::module_ & m) {
    llama_backend_init();

    m.attr("LLAMA_CPP_VERSION") = LAMINA_LLAMA_CPP_VERSION;
    m.attr("LLAMA_CPP_COMMIT") = LAMINA_LLAMA_CPP_COMMIT;
    m.attr("LLAMA_CPP_SOURCE") = LAMINA_LLAMA_CPP_SOURCE;
    m.attr("PORTABLE") = bool(LAMINA_PORTABLE);
    m.attr("BACKEND_DL") = bool(LAMINA_BACKEND_DL);

    m.def("backends_load", [](const std::string & dir) {
#if LAMINA_BACKEND_DL
        nb::gil_scoped_release nogil;
        ggml_backend_load_all_from_path(dir.c_str());
#else
        (void) dir;  // backends are linked in
#endif
    }, nb::arg("dir"),
    "Load the backend libraries shipped in ``dir`` (portable builds); a no-op when linked in.");

    m.def("backends", []() {
        nb::list out;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
            ggml_backend_reg_t reg = ggml_backend_reg_get(i);
            nb::dict d;
            d["name"] = ggml_backend_reg_name(reg);
            d["n_devices"] = ggml_backend_reg_dev_count(reg);
            d["features"] = backend_features(reg);
            out.append(d);
        }
        return out;
    }, "Registered ggml backends: name, device count, features (CPU: the variant's ISA flags).");

    m.def("system_info_string", []() { return std::string(llama_print_system_info()); },
          "llama.cpp's own one-line system report.");

    m.def("supports", []() {
        nb::dict d;
        d["mmap"] = llama_supports_mmap();
        d["mlock"] = llama_supports_mlock();
        d["gpu_offload"] = llama_supports_gpu_offload();
        d["rpc"] = llama_supports_rpc();
        d["max_devices"] = llama_max_devices();
        d["max_parallel_sequences"] = llama_max_parallel_sequences();
        return d;
    }, "What this llama.cpp build supports.");

    m.def("time_us", []() { return llama_time_us(); }, "llama.cpp's clock, microseconds.");
}

}  // namespace lamina
