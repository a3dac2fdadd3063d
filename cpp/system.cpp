// What was built and what is loaded: llama.cpp version, backends, CPU features.
#include "lamina.h"

#include <filesystem>
#if !defined(_WIN32)
#include <dlfcn.h>
#endif

#include "ggml-backend.h"

#include <nanobind/stl/pair.h>

namespace lamina {
namespace {

nb::dict backend_features(ggml_backend_reg_t reg) {
    nb::dict feats;
    auto fn = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    if (fn == nullptr) return feats;
    for (ggml_backend_feature * f = fn(reg); f != nullptr && f->name != nullptr; ++f) {
        feats[f->name] = f->value ? f->value : "";
    }
    return feats;
}

}  // namespace

#if LAMINA_BACKEND_DL && !defined(_WIN32)
// Portable builds ship every CPU variant as libggml-cpu-<variant>.so; ggml loads the one with the
// best score. LAMINA_CPU_VARIANT picks another (a lower one, to prove a variant runs here, or to
// compare): its score function says whether this CPU has its instructions, so a variant the CPU
// lacks is refused instead of dying with an illegal instruction. The other backends load as usual.
std::string load_with_cpu_variant(const std::string & dir, const std::string & variant) {
    namespace fs = std::filesystem;
    const std::string lib = "libggml-", cpu = "libggml-cpu-", ext = ".so";  // (POSIX only, see the caller)
    const fs::path want = fs::path(dir) / (cpu + variant + ext);
    std::string warning;
    bool cpu_loaded = false;
    std::error_code ec;
    if (!fs::exists(want, ec)) {
        warning = "LAMINA_CPU_VARIANT=" + variant + ": no " + want.filename().string() + " in this package";
    } else {
        void * h = dlopen(want.c_str(), RTLD_NOW | RTLD_LOCAL);
        using score_fn = int (*)();
        auto score = h ? reinterpret_cast<score_fn>(dlsym(h, "ggml_backend_score")) : nullptr;
        const int sc = score ? score() : 0;
        if (h) dlclose(h);
        if (sc <= 0) {
            warning = "LAMINA_CPU_VARIANT=" + variant + ": this CPU lacks instructions that variant needs";
        } else {
            gil_release nogil;
            cpu_loaded = ggml_backend_load(want.c_str()) != nullptr;
        }
    }
    if (!cpu_loaded) {  // the best CPU variant, and everything else, as without the variable
        gil_release nogil;
        ggml_backend_load_all_from_path(dir.c_str());
        return warning + "; using the best variant for this CPU instead";
    }
    // every other backend library in the folder (RPC, GPU add-ons): not the CPU variants, not ggml-base
    for (const auto & e : fs::directory_iterator(dir, ec)) {
        const std::string name = e.path().filename().string();
        const bool so = name.size() > ext.size() && name.compare(name.size() - ext.size(), ext.size(), ext) == 0;
        if (!so || name.rfind(lib, 0) != 0 || name.rfind(cpu, 0) == 0 || name == lib + "base" + ext) continue;
        gil_release nogil;
        ggml_backend_load(e.path().c_str());
    }
    return warning;  // empty: the variant asked for is in use
}
#endif

void init_system(nb::module_ & m) {
    llama_backend_init();

    m.attr("VERSION") = LAMINA_VERSION;  // lamina's (pyproject.toml), which add-ons must match
    m.attr("LLAMA_CPP_VERSION") = LAMINA_LLAMA_CPP_VERSION;
    m.attr("LLAMA_CPP_COMMIT") = LAMINA_LLAMA_CPP_COMMIT;
    m.attr("LLAMA_CPP_SOURCE") = LAMINA_LLAMA_CPP_SOURCE;
    m.attr("PORTABLE") = bool(LAMINA_PORTABLE);
    m.attr("BACKEND_DL") = bool(LAMINA_BACKEND_DL);

    m.def("backends_load", [](const std::string & dir, const std::string & cpu_variant) {
#if LAMINA_BACKEND_DL
#if !defined(_WIN32)
        if (!cpu_variant.empty()) return load_with_cpu_variant(dir, cpu_variant);
#endif
        without_gil([&] { ggml_backend_load_all_from_path(dir.c_str()); });
        return std::string(cpu_variant.empty() ? "" : "LAMINA_CPU_VARIANT is not supported on Windows yet: using the "
                                                      "best variant");
#else
        (void) dir;  // backends are linked in
        if (!cpu_variant.empty()) {
            return std::string("LAMINA_CPU_VARIANT is ignored: this build links one CPU backend (not portable)");
        }
        return std::string();
#endif
    }, nb::arg("dir"), nb::arg("cpu_variant") = "",
    "Load the backend libraries shipped in ``dir`` (portable builds; a no-op when linked in). With\n"
    "cpu_variant, the CPU backend is that variant (libggml-cpu-<variant>) instead of the best one, if\n"
    "this CPU can run it. Returns a warning to show, or ''.");

    m.def("backend_load_file", [](const std::string & path) {
        // One GPU add-on's backend library (lamina-cuda13, lamina-vulkan, ...). ggml's loader only
        // logs why a library failed, and returns null: the reason comes back here instead, so lamina
        // can say it (a missing libcudart or driver, an API mismatch, a backend with no device).
        nb::dict out;
        std::string error, name;
        size_t n_devices = 0;
#if LAMINA_BACKEND_DL
        {
            gil_release nogil;
#if !defined(_WIN32)
            void * h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);  // the loader's own words on failure
            if (h == nullptr) {
                const char * e = dlerror();
                error = e ? e : "dlopen failed";
            }
#endif
            if (error.empty()) {
                clear_last_log_error();
                ggml_backend_reg_t reg = ggml_backend_load(path.c_str());
                if (reg == nullptr) {
                    error = first_log_error();
                    if (error.empty()) error = "ggml could not load it (see the 'lamina' log)";
                } else {
                    name = ggml_backend_reg_name(reg);
                    n_devices = ggml_backend_reg_dev_count(reg);
                    if (n_devices == 0) {  // registered, but its runtime found nothing (no driver, no GPU)
                        error = first_log_error();
                        if (error.empty()) error = "the backend loaded but found no device";
                    }
                }
            }
#if !defined(_WIN32)
            if (h != nullptr) dlclose(h);  // ggml holds its own handle when it loaded the library
#endif
        }
#else
        error = "this lamina links its backends in (a build without GGML_BACKEND_DL): add-ons need the "
                "lamina wheel or a LAMINA_PORTABLE=ON build";
        (void) path;
#endif
        out["name"] = name;
        out["n_devices"] = n_devices;
        out["error"] = error;
        return out;
    }, nb::arg("path"),
    "Load one backend library (a GPU add-on's) into ggml's registry. Returns {name, n_devices, error}:\n"
    "error is '' when the backend is registered with at least one device, else the reason.");

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

}

}  // namespace lamina
