// Memory before allocation: llama.cpp's own no-alloc load (common/fit.h) gives the bytes a model
// and a context would take on each device, and common_fit_params picks the layers and context
// size that fit free device memory. lamina uses them for n_gpu_layers="auto" and for estimates.
#include "lamina.h"

#include "fit.h"
#include "ggml-backend.h"
#include "log.h"

namespace lamina {
namespace {

constexpr int64_t MiB = 1024 * 1024;

[[noreturn]] void rethrow(const std::exception & e, const std::string & what) {
    std::string why = last_log_error();
    std::string msg = what + ": " + e.what();
    if (!why.empty()) msg += " (" + why + ")";
    if (msg.find("bad_alloc") != std::string::npos || msg.find("out of memory") != std::string::npos) {
        throw out_of_memory_error(msg);
    }
    throw lamina_error(msg);
}

// Bytes of model, context and compute buffers per device of the model, then the host.
nb::list memory_estimate(const std::string & path, const model_args & margs, const context_args & cargs) {
    model_params mp;
    build_model_params(margs, mp);
    llama_context_params cp = build_context_params(cargs);
    std::vector<ggml_backend_dev_t> devs;
    uint32_t hp_ngl = 0, hp_n_ctx_train = 0, hp_n_expert = 0;
    common_device_memory_data_vec data;
    clear_last_log_error();
    {
        nb::gil_scoped_release nogil;
        try {
            data = common_get_device_memory_data(path.c_str(), &mp.p, &cp, devs, hp_ngl, hp_n_ctx_train,
                                                 hp_n_expert, GGML_LOG_LEVEL_ERROR);
        } catch (const std::exception & e) {
            nb::gil_scoped_acquire gil;
            rethrow(e, "memory estimate failed");
        }
    }
    nb::list out;
    for (size_t i = 0; i < data.size(); ++i) {
        nb::dict d;
        bool host = i + 1 == data.size();
        d["device"] = host ? std::string("host") : std::string(ggml_backend_dev_name(devs.at(i)));
        d["model"] = data[i].model;
        d["context"] = data[i].context;
        d["compute"] = data[i].compute;
        d["free"] = data[i].free;
        d["total"] = data[i].total;
        out.append(d);
    }
    return out;
}

// common_fit_params: the most layers (and, with n_ctx 0, the largest context >= n_ctx_min) that
// fit every device's free memory minus its margin. Only n_gpu_layers, tensor_split, tensor
// overrides and n_ctx may change; the result is applied by the caller through a normal load.
nb::dict fit(const std::string & path, const model_args & margs, const context_args & cargs,
             const std::vector<int64_t> & margins_bytes, uint32_t n_ctx_min) {
    model_params mp;
    build_model_params(margs, mp);
    mp.p.n_gpu_layers = llama_model_default_params().n_gpu_layers;  // "fit me" (only defaults are changed)
    if (std::get<4>(margs)) {
        throw std::invalid_argument("n_gpu_layers='auto' chooses the split itself: leave tensor_split unset");
    }
    if (!std::get<5>(margs).empty()) {
        throw std::invalid_argument("n_gpu_layers='auto' places tensors itself: give tensor overrides with an int n_gpu_layers");
    }
    llama_context_params cp = build_context_params(cargs);
    const size_t n_max = llama_max_devices();
    std::vector<float> split(n_max, 0.0f);
    std::vector<llama_model_tensor_buft_override> ov(llama_max_tensor_buft_overrides(), {nullptr, nullptr});
    std::vector<size_t> margins(n_max, size_t(1024 * MiB));
    if (margins_bytes.size() > n_max) throw std::invalid_argument("more margins than devices");
    for (size_t i = 0; i < margins_bytes.size(); ++i) {
        if (margins_bytes[i] < 0) throw std::invalid_argument("memory margins must be >= 0");
        margins[i] = size_t(margins_bytes[i]);
    }
    mp.p.tensor_split = split.data();  // fit writes into these buffers
    common_params_fit_status status;
    clear_last_log_error();
    {
        nb::gil_scoped_release nogil;
        try {
            status = common_fit_params(path.c_str(), &mp.p, &cp, split.data(), ov.data(), margins.data(), n_ctx_min,
                                       nullptr, GGML_LOG_LEVEL_ERROR);
        } catch (const std::exception & e) {
            nb::gil_scoped_acquire gil;
            rethrow(e, "memory fit failed");
        }
    }
    nb::dict d;
    d["status"] = status == COMMON_PARAMS_FIT_STATUS_SUCCESS ? "fits"
                : status == COMMON_PARAMS_FIT_STATUS_FAILURE ? "does not fit" : "error";
    d["n_gpu_layers"] = mp.p.n_gpu_layers;
    d["n_ctx"] = cp.n_ctx;
    std::vector<float> split_out;
    size_t n_devs = 0;
    while (mp.p.devices != nullptr && mp.p.devices[n_devs] != nullptr) ++n_devs;
    if (mp.p.devices == nullptr) n_devs = n_max;
    for (size_t i = 0; i < n_devs && i < n_max; ++i) split_out.push_back(split[i]);
    while (!split_out.empty() && split_out.back() == 0.0f) split_out.pop_back();
    d["tensor_split"] = split_out;
    size_t n_ov = 0;
    while (n_ov < ov.size() && ov[n_ov].pattern != nullptr) ++n_ov;
    d["n_overrides"] = n_ov;
    if (n_ov > 0) {
        // MoE fits move expert tensors to the CPU through overrides; lamina does not carry them
        // over yet, so such a fit is reported, not applied (see the offload issue note).
        d["status"] = "needs tensor overrides";
    }
    return d;
}

}  // namespace

void init_fit(nb::module_ & m) {
    // common/'s own logger prints to stdout from a worker thread (the fit's progress and its
    // errors, e.g. for a truncated file, which the load that follows reports as LoadError).
    // llama.cpp's log still reaches Python logging; common's is discarded while paused.
    common_log_pause(common_log_main());
    m.def("memory_estimate", &memory_estimate, nb::arg("path"), nb::arg("placement"), nb::arg("settings"),
          "Per device (then host): bytes of model weights, context (KV, outputs) and compute buffers "
          "that loading with these settings would allocate; llama.cpp's no-alloc load, nothing allocated.");
    m.def("fit", &fit, nb::arg("path"), nb::arg("placement"), nb::arg("settings"), nb::arg("margins"),
          nb::arg("n_ctx_min") = 0,
          "llama.cpp's common_fit_params: n_gpu_layers, tensor_split and n_ctx that fit free device memory.");
}

}  // namespace lamina
