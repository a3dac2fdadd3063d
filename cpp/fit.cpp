// Memory before allocation: llama.cpp's own no-alloc load (common/fit.h) gives the bytes a model
// and a context would take on each device, and common_fit_params picks the layers and context
// size that fit free device memory. lamina uses them for n_gpu_layers="auto" and for estimates.
#include "lamina.h"

#include "fit.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "log.h"

#include <algorithm>

namespace lamina {
namespace {

constexpr int64_t MiB = 1024 * 1024;

// Run a common/ call without the GIL; its exception becomes a lamina error named `what`, with
// llama.cpp's last error line (OutOfMemoryError when either says memory ran out).
template <typename Call>
void call_common(const std::string & what, Call call) {
    clear_last_log_error();
    gil_release nogil;
    llama_work work;
    try {
        call();
    } catch (const std::exception & e) {
        gil_acquire gil;
        std::string why = last_log_error();
        std::string msg = what + ": " + e.what();
        if (!why.empty()) msg += " (" + why + ")";
        if (msg.find("bad_alloc") != std::string::npos || msg.find("out of memory") != std::string::npos) {
            throw out_of_memory_error(msg);
        }
        throw lamina_error(msg);
    }
}

// Bytes of model, context and compute buffers per device of the model, then the host.
nb::list memory_estimate(const std::string & path, const placement & margs, const context_params & cargs) {
    model_params mp;
    build_model_params(margs, mp);
    llama_context_params cp = build_context_params(cargs);
    std::vector<ggml_backend_dev_t> devs;
    uint32_t hp_ngl = 0, hp_n_ctx_train = 0, hp_n_expert = 0;
    common_device_memory_data_vec data;
    call_common("memory estimate failed", [&] {
        data = common_get_device_memory_data(path.c_str(), &mp.p, &cp, devs, hp_ngl, hp_n_ctx_train, hp_n_expert,
                                             GGML_LOG_LEVEL_ERROR);
    });
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
// fit every device's free memory minus its margin; for a mixture-of-experts model it first moves
// expert tensors to host memory. Only n_gpu_layers, tensor_split, tensor overrides and n_ctx may
// change; the caller applies the result through a normal load.
nb::dict fit(const std::string & path, const placement & margs, const context_params & cargs,
             const std::vector<int64_t> & margins_bytes, uint32_t n_ctx_min) {
    model_params mp;
    build_model_params(margs, mp);
    mp.p.n_gpu_layers = llama_model_default_params().n_gpu_layers;  // "fit me" (only defaults are changed)
    if (margs.tensor_split) {
        throw std::invalid_argument("n_gpu_layers='auto' chooses the split itself: leave tensor_split unset");
    }
    if (!margs.overrides.empty()) {
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
    call_common("memory fit failed", [&] {
        status = common_fit_params(path.c_str(), &mp.p, &cp, split.data(), ov.data(), margins.data(), n_ctx_min,
                                   nullptr, GGML_LOG_LEVEL_ERROR);
    });
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
    // A mixture-of-experts fit moves expert tensors off the devices through overrides (llama.cpp's
    // --fit does the same): hand them back as (pattern, device index), -1 for host memory
    nb::list overrides;
    for (size_t i = 0; i < ov.size() && ov[i].pattern != nullptr; ++i) {
        int dev = -1;
        for (size_t k = 0; k < ggml_backend_dev_count(); ++k) {
            ggml_backend_dev_t dk = ggml_backend_dev_get(k);
            if (ggml_backend_dev_type(dk) != GGML_BACKEND_DEVICE_TYPE_CPU && ggml_backend_dev_buffer_type(dk) == ov[i].buft) {
                dev = int(k);
            }
        }
        overrides.append(nb::make_tuple(std::string(ov[i].pattern), dev));
    }
    d["overrides"] = overrides;
    return d;
}

std::string meta(const llama_model * m, const std::string & key) {
    char buf[128];
    const int32_t n = llama_model_meta_val_str(m, key.c_str(), buf, sizeof buf);
    return n < 0 ? std::string() : std::string(buf);
}

// What one layer's K and V cache tensors are made of: n_head_kv heads of head_k / head_v values.
struct kv_dims {
    int64_t n_head_kv = 1, head_k = 0, head_v = 0;
    int64_t n_ctx_train = 0;  // from the file only
};

kv_dims dims_of_model(const llama_model * m) {
    const std::string arch = meta(m, "general.architecture");
    const int64_t n_head = std::max(1, llama_model_n_head(m));
    const std::string kl = meta(m, arch + ".attention.key_length"), vl = meta(m, arch + ".attention.value_length");
    kv_dims d;
    d.n_head_kv = std::max(1, llama_model_n_head_kv(m));
    d.head_k = kl.empty() ? llama_model_n_embd(m) / n_head : std::stoll(kl);
    d.head_v = vl.empty() ? d.head_k : std::stoll(vl);
    return d;
}

// An integer GGUF value, or the largest element of an integer array (per-layer head counts); -1 if absent.
int64_t gguf_int(const gguf_context * g, const std::string & key) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return -1;
    auto one = [](gguf_type t, const void * p) -> int64_t {
        switch (t) {
            case GGUF_TYPE_UINT8: return *static_cast<const uint8_t *>(p);
            case GGUF_TYPE_INT8: return *static_cast<const int8_t *>(p);
            case GGUF_TYPE_UINT16: return *static_cast<const uint16_t *>(p);
            case GGUF_TYPE_INT16: return *static_cast<const int16_t *>(p);
            case GGUF_TYPE_UINT32: return *static_cast<const uint32_t *>(p);
            case GGUF_TYPE_INT32: return *static_cast<const int32_t *>(p);
            case GGUF_TYPE_UINT64: return int64_t(*static_cast<const uint64_t *>(p));
            case GGUF_TYPE_INT64: return *static_cast<const int64_t *>(p);
            default: return -1;
        }
    };
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t != GGUF_TYPE_ARRAY) return one(t, gguf_get_val_data(g, id));
    const gguf_type at = gguf_get_arr_type(g, id);
    const size_t size = at == GGUF_TYPE_UINT8 || at == GGUF_TYPE_INT8     ? 1
                        : at == GGUF_TYPE_UINT16 || at == GGUF_TYPE_INT16 ? 2
                        : at == GGUF_TYPE_UINT32 || at == GGUF_TYPE_INT32 ? 4
                        : at == GGUF_TYPE_UINT64 || at == GGUF_TYPE_INT64 ? 8
                                                                          : 0;
    const size_t n = gguf_get_arr_n(g, id);
    if (size == 0) return -1;
    const auto * data = static_cast<const uint8_t *>(gguf_get_arr_data(g, id));
    int64_t best = -1;
    for (size_t i = 0; i < n; ++i) best = std::max(best, one(at, data + i * size));
    return best;
}

kv_dims dims_of_file(const std::string & path) {
    gguf_init_params params{true, nullptr};
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (g == nullptr) throw load_error("not a readable GGUF file: '" + path + "'");
    const int64_t arch_id = gguf_find_key(g, "general.architecture");
    const std::string arch = arch_id < 0 ? "" : gguf_get_val_str(g, arch_id);
    const int64_t n_embd = gguf_int(g, arch + ".embedding_length"), n_head = gguf_int(g, arch + ".attention.head_count");
    const int64_t n_head_kv = gguf_int(g, arch + ".attention.head_count_kv");
    const int64_t kl = gguf_int(g, arch + ".attention.key_length"), vl = gguf_int(g, arch + ".attention.value_length");
    const int64_t n_ctx_train = gguf_int(g, arch + ".context_length");
    gguf_free(g);
    kv_dims d;
    d.n_head_kv = std::max<int64_t>(1, n_head_kv > 0 ? n_head_kv : n_head);
    d.head_k = kl > 0 ? kl : (n_head > 0 && n_embd > 0 ? n_embd / n_head : 0);
    d.head_v = vl > 0 ? vl : d.head_k;
    d.n_ctx_train = std::max<int64_t>(0, n_ctx_train);
    return d;
}

// Devices among `devices` that refuse one layer's K or V cache tensor for n_ctx positions, with its
// bytes. llama.cpp allocates each layer's cache on the layer's device and then aborts the process
// in the scheduler when the device cannot use a tensor that large (Vulkan: maxStorageBufferRange,
// 128 MiB on lavapipe), so this is asked of the device first.
nb::list refusals(const kv_dims & d, int64_t n_ctx, int type_k, int type_v, const std::vector<std::string> & devices) {
    if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be > 0");
    if (type_k < 0 || type_k >= GGML_TYPE_COUNT || type_v < 0 || type_v >= GGML_TYPE_COUNT) {
        throw std::invalid_argument("invalid K/V type");
    }
    // llama.cpp pads the context to 256 cells (llama-context.cpp: GGML_PAD(cparams.n_ctx, 256)); there is
    // no API to ask before a context exists. tests/test_shape.py fails if a llama.cpp bump changes it.
    constexpr int64_t kv_cell_pad = 256;
    const int64_t cells = (n_ctx + kv_cell_pad - 1) / kv_cell_pad * kv_cell_pad;
    const size_t big = std::max(ggml_row_size(ggml_type(type_k), d.n_head_kv * d.head_k),
                                ggml_row_size(ggml_type(type_v), d.n_head_kv * d.head_v)) * size_t(cells);
    nb::list out;
    if (big == 0) return out;
    ggml_init_params params{ggml_tensor_overhead() * 2, nullptr, true};
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, int64_t(big));  // op NONE: a stored tensor
    for (const std::string & name : devices) {
        ggml_backend_dev_t dev = device_named(name);
        if (dev && !ggml_backend_dev_supports_op(dev, t)) out.append(nb::make_tuple(ggml_backend_dev_name(dev), big));
    }
    ggml_free(ctx);
    return out;
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
    m.def("kv_tensor_refusals", [](nb::handle model, int64_t n_ctx, int type_k, int type_v,
                                   const std::vector<std::string> & devices) {
        auto ms = model_shared(model);
        if (ms->vocab_only) throw std::invalid_argument("a vocabulary-only model (a tokenizer) has no KV cache shapes");
        return refusals(dims_of_model(ms->model.get()), n_ctx, type_k, type_v, devices);
    }, nb::arg("model"), nb::arg("n_ctx"), nb::arg("type_k"), nb::arg("type_v"), nb::arg("devices"),
    "[(device, bytes)] of the devices that cannot use one layer's K or V cache tensor for n_ctx positions.");
    m.def("kv_tensor_refusals_file", [](const std::string & path, int64_t n_ctx, int type_k, int type_v,
                                        const std::vector<std::string> & devices) {
        check_gguf_file(path);
        const kv_dims d = dims_of_file(path);
        if (n_ctx == 0 && d.n_ctx_train > 0) n_ctx = d.n_ctx_train;
        return refusals(d, n_ctx, type_k, type_v, devices);
    }, nb::arg("path"), nb::arg("n_ctx"), nb::arg("type_k"), nb::arg("type_v"), nb::arg("devices"),
    "The same from the GGUF file's metadata, before the model is loaded (for the 'auto' fit); n_ctx=0: "
    "the training context.");
    m.def("fit", &fit, nb::arg("path"), nb::arg("placement"), nb::arg("settings"), nb::arg("margins"),
          nb::arg("n_ctx_min") = 0,
          "llama.cpp's common_fit_params: n_gpu_layers, tensor_split and n_ctx that fit free device memory.");
}

}  // namespace lamina
