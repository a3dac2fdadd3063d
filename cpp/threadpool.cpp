// ggml CPU threadpools: created through the CPU backend's registry (works when the CPU backend
// is a dynamically loaded library, as in portable builds) and attached to a context, as
// llama-bench does. A persistent pool saves ggml from building a disposable one per graph.
//
// Pinning: each pool's worker threads apply its CPU mask and priority themselves when they
// start. Worker 0 is whichever thread calls the decode; ggml pins the thread that creates or
// resumes a pool and never restores it. lamina therefore restores the caller after creating a
// pool, and pins / restores the calling thread around every decode (caller_pin).
#include "lamina.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#ifdef __linux__
#include <pthread.h>
#include <sched.h>
#endif

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

#ifdef __linux__
// ggml's mapping of ggml_sched_priority to a Linux policy (ggml-cpu.c, ggml_thread_apply_priority)
void prio_policy(int prio, int & policy, sched_param & sp) {
    std::memset(&sp, 0, sizeof(sp));
    switch (prio) {
        case GGML_SCHED_PRIO_LOW: policy = SCHED_BATCH; break;
        case GGML_SCHED_PRIO_MEDIUM: policy = SCHED_FIFO; sp.sched_priority = 40; break;
        case GGML_SCHED_PRIO_HIGH: policy = SCHED_FIFO; sp.sched_priority = 80; break;
        case GGML_SCHED_PRIO_REALTIME: policy = SCHED_FIFO; sp.sched_priority = 90; break;
        default: policy = SCHED_OTHER; break;
    }
}

const char * prio_name(int prio) {
    switch (prio) {
        case GGML_SCHED_PRIO_LOW: return "low";
        case GGML_SCHED_PRIO_MEDIUM: return "medium";
        case GGML_SCHED_PRIO_HIGH: return "high";
        case GGML_SCHED_PRIO_REALTIME: return "realtime";
        default: return "normal";
    }
}
#endif

// ggml's threads print a warning and run on when the OS refuses a priority or mask; lamina
// refuses before creating the pool instead, by trying it on the calling thread and undoing it.
void check_allowed(const threadpool_config & cfg) {
#ifdef __linux__
    if (cfg.prio != 0) {
        int old_policy;
        sched_param old_sp;
        pthread_getschedparam(pthread_self(), &old_policy, &old_sp);
        int policy;
        sched_param sp;
        prio_policy(cfg.prio, policy, sp);
        int err = pthread_setschedparam(pthread_self(), policy, &sp);
        pthread_setschedparam(pthread_self(), old_policy, &old_sp);
        if (err != 0) {
            throw permission_error(std::string("thread priority '") + prio_name(cfg.prio) +
                                   "' was refused by the OS (" + std::strerror(err) +
                                   "): real-time priorities need CAP_SYS_NICE or an RLIMIT_RTPRIO above " +
                                   std::to_string(sp.sched_priority));
        }
    }
#endif
    if (cfg.strict && cfg.n_threads > int(cfg.cpus.size())) {
        throw std::invalid_argument("strict pinning places one thread per CPU: " + std::to_string(cfg.n_threads) +
                                    " threads need at least as many CPUs, got " + std::to_string(cfg.cpus.size()));
    }
    for (int c : cfg.cpus) {
        if (c < 0 || c >= GGML_MAX_N_THREADS) {
            throw std::invalid_argument("cpu " + std::to_string(c) + " out of range [0, " +
                                        std::to_string(GGML_MAX_N_THREADS) + ")");
        }
    }
    if (cfg.poll > 100) throw std::invalid_argument("poll must be in [0, 100]");
}

// Worker 0's CPUs as ggml assigns them (ggml_thread_cpumask_next): with strict pinning workers
// 1..n-1 take the listed CPUs in order and worker 0 the next one; otherwise every worker gets all.
pin_plan plan_for(const threadpool_config & cfg) {
    pin_plan plan;
    plan.prio = cfg.prio;
    if (cfg.cpus.empty()) return plan;
    std::vector<int> cpus = cfg.cpus;
    std::sort(cpus.begin(), cpus.end());
    cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
    plan.cpus = cfg.strict ? std::vector<int>{cpus[size_t(cfg.n_threads - 1) % cpus.size()]} : cpus;
    return plan;
}

ggml_threadpool * pool_new(const threadpool_config & cfg) {
    const threadpool_api & a = api();
    // no CPU backend threadpools: ggml uses its per-graph pools
    if (a.create == nullptr || a.destroy == nullptr) return nullptr;
    ggml_threadpool_params p = ggml_threadpool_params_default(cfg.n_threads);
    p.prio = static_cast<ggml_sched_priority>(cfg.prio);
    p.poll = cfg.poll;
    p.strict_cpu = cfg.strict;
    for (int c : cfg.cpus) p.cpumask[c] = true;
    ggml_threadpool * tp;
    {
        // creating a pool pins and prioritises the creating thread as worker 0: undo that
        caller_pin restore(plan_for(cfg));
        tp = a.create(&p);
    }
    if (tp == nullptr) {
        throw lamina_error("ggml_threadpool_new failed for " + std::to_string(cfg.n_threads) + " threads");
    }
    return tp;
}

}  // namespace

#ifdef __linux__
struct caller_pin::saved {
    bool mask = false, prio = false;
    cpu_set_t set;
    int policy = SCHED_OTHER;
    sched_param sp{};
};

caller_pin::caller_pin(const pin_plan & plan) {
    if (!plan.active()) return;
    saved_ = std::make_unique<saved>();
    pthread_t self = pthread_self();
    if (!plan.cpus.empty() && pthread_getaffinity_np(self, sizeof(cpu_set_t), &saved_->set) == 0) {
        cpu_set_t want;
        CPU_ZERO(&want);
        for (int c : plan.cpus) CPU_SET(c, &want);
        saved_->mask = pthread_setaffinity_np(self, sizeof(cpu_set_t), &want) == 0;
    }
    if (plan.prio != 0 && pthread_getschedparam(self, &saved_->policy, &saved_->sp) == 0) {
        int policy;
        sched_param sp;
        prio_policy(plan.prio, policy, sp);
        saved_->prio = pthread_setschedparam(self, policy, &sp) == 0;
    }
}

caller_pin::~caller_pin() {
    if (!saved_) return;
    pthread_t self = pthread_self();
    if (saved_->prio) pthread_setschedparam(self, saved_->policy, &saved_->sp);
    if (saved_->mask) pthread_setaffinity_np(self, sizeof(cpu_set_t), &saved_->set);
}
#else
struct caller_pin::saved {};
caller_pin::caller_pin(const pin_plan &) {}
caller_pin::~caller_pin() = default;
#endif

void pool_free(ggml_threadpool * tp) {
    if (tp != nullptr && api().destroy != nullptr) api().destroy(tp);
}

void threadpools_attach(context_state & st, const threadpool_config & gen, const threadpool_config & batch) {
    check_allowed(gen);
    check_allowed(batch);
    ggml_threadpool * tp = pool_new(gen);
    ggml_threadpool * tpb = nullptr;
    try {
        if (tp != nullptr && !(batch == gen)) tpb = pool_new(batch);
    } catch (...) {
        pool_free(tp);
        throw;
    }
    llama_detach_threadpool(st.ctx.get());
    // not freed yet: the CPU backend still points at the pool it ran on last (see retired_pools)
    for (ggml_threadpool * old : {st.pool, st.pool_batch}) {
        if (old != nullptr) st.retired_pools.push_back(old);
    }
    st.pool = tp;
    st.pool_batch = tpb;
    st.pin_gen = tp != nullptr ? plan_for(gen) : pin_plan{};
    st.pin_batch = tp != nullptr ? plan_for(tpb != nullptr ? batch : gen) : pin_plan{};
    if (tp != nullptr) llama_attach_threadpool(st.ctx.get(), tp, tpb);
}

}  // namespace lamina
