// Exclusive use of a context, the locks lamina takes, and their order.
#pragma once

#include <nanobind/nanobind.h>

#include <cstdint>
#include <memory>
#include <shared_mutex>

namespace lamina {

namespace nb = nanobind;

// Leases and locks. The order, outermost first; a thread never takes one above one it holds:
//   1. the GIL
//   2. a context lease (context_state::busy): never waits (busy_error), so it cannot deadlock
//   3. lora_registry(): shared for decodes, context creation and draft decodes; exclusive to load
//      or free an adapter, taken with the GIL released
//   4. the context's engine mutex (engine::mu, engine.h): bookkeeping only; never held across a
//      llama.cpp call or while taking the GIL, so a thread may wait for it holding the GIL
//   5. leaf locks: logging's queue and last-error mutexes, model_state::lost_mutex
// No lamina lock is held while taking the GIL, and none but 3 across a llama.cpp call. llama.cpp
// may log from any call and any thread: the log callback takes only the leaf locks (it queues the
// line; exit.h's classes deliver it with the GIL), so holding 3 across a decode cannot deadlock.

struct context_state;

// llama.cpp reads a model's set of loaded adapters (graph_max_nodes) when it creates a context and
// reserves a graph (the first decode after a change of adapters); loading and freeing an adapter
// change that set. Readers share this lock (context creation, decode_checked), writers own it.
std::shared_mutex & lora_registry();

// Exclusive use of a context for one native operation. Raises busy_error when another thread is
// using it (never waits: no deadlock with the GIL or a second lease in the same thread) and
// fork_error in a child process. `owner`: the generator taking it (others detach its backend
// sampler first).
class context_lease {
public:
    explicit context_lease(std::shared_ptr<context_state> st, const void * owner = nullptr);
    ~context_lease();
    context_lease(const context_lease &) = delete;
    context_lease & operator=(const context_lease &) = delete;
    context_state & operator*() const { return *st_; }
    context_state * operator->() const { return st_.get(); }
    const std::shared_ptr<context_state> & shared() const { return st_; }
private:
    std::shared_ptr<context_state> st_;
};
// A compute operation starts on a leased context: a decode call (op 0), or a generation's step (op:
// its number from new_operation_id(), the same for every token). ctx.abort() stops the operation
// running when it is called; one that arrived after the last operation ended (or while only
// read-only calls ran) is dropped here, so it never stops a later, unrelated call.
void begin_operation(context_state & st, uint64_t op = 0);
uint64_t new_operation_id();
// The shared context state behind a lamina._native.Context (raises ClosedError).
std::shared_ptr<context_state> context_shared(nb::handle ctx);
// context_shared, leased (raises ClosedError, BusyError, ForkError).
inline context_lease context_leased(nb::handle ctx, const void * owner = nullptr) {
    return context_lease(context_shared(ctx), owner);
}

}  // namespace lamina
