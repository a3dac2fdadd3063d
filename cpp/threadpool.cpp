// ggml CPU threadpools: created through the CPU backend's registry (works when the CPU backend
// is a dynamically loaded library, as in portable builds) and attached to a context, as
// llama-bench does. A persistent pool saves ggml from building a disposable one per graph.
#include "lamina.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

namespace lamina {
namespace {

struct threadpool_api {
    decltype(ggml_threadpool_new) * create = nullptr;
    decltype(ggml_threadpool_free) * destroy = nullptr;
};

const threadpool_api & api() {
    static threadpool_api a = [] {
        threadpool_api r;
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (cpu != nullptr) {
            ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
            r.create = reinterpret_cast<decltype(ggml_threadpool_new) *>(
                ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new"));
            r.destroy = reinterpret_cast<decltype(ggml_threadpool_free) *>(
                ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free"));
        }
        return r;
    }();
    return a;
}

ggml_threadpool * pool_new(const threadpool_config & cfg) {
    const threadpool_api & a = api();
    if (a.create == nullptr || a.destroy == nullptr) {
        return nullptr;  // no CPU backend threadpools: ggml uses its per-graph pools
    }
    ggml_threadpool_params p = ggml_threadpool_params_default(cfg.n_threads);
    p.prio = static_cast<ggml_sched_priority>(cfg.prio);
    p.poll = cfg.poll;
    p.strict_cpu = cfg.strict;
    for (int c : cfg.cpus) {
        if (c < 0 || c >= GGML_MAX_N_THREADS) {
            throw std::invalid_argument("cpu " + std::to_string(c) + " out of range [0, " +
                                        std::to_string(GGML_MAX_N_THREADS) + ")");
        }
        p.cpumask[c] = true;
    }
    ggml_threadpool * tp = a.create(&p);
    if (tp == nullptr) {
        throw lamina_error("ggml_threadpool_new failed for " + std::to_string(cfg.n_threads) + " threads");
    }
    return tp;
}

}  // namespace

void pool_free(ggml_threadpool * tp) {
    if (tp != nullptr && api().destroy != nullptr) {
        api().destroy(tp);
    }
}

void threadpools_attach(context_state & st, const threadpool_config & gen, const threadpool_config & batch) {
    ggml_threadpool * tp = pool_new(gen);
    ggml_threadpool * tpb = nullptr;
    try {
        if (tp != nullptr && !(batch == gen)) {
            tpb = pool_new(batch);
        }
    } catch (...) {
        pool_free(tp);
        throw;
    }
    llama_detach_threadpool(st.ctx.get());
    pool_free(st.pool);
    pool_free(st.pool_batch);
    st.pool = tp;
    st.pool_batch = tpb;
    if (tp != nullptr) {
        llama_attach_threadpool(st.ctx.get(), tp, tpb);
    }
}

}  // namespace lamina
