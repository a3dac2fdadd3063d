// Memory bandwidth: a read probe and a copy probe over a buffer much larger than the caches,
// for `lamina doctor` (the token-generation ceiling is bandwidth / bytes read per token).
#include "lamina.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace lamina {
namespace {

using clock_type = std::chrono::steady_clock;

// Sum of uint64 words with eight independent accumulators: no dependency chain, so the loop is
// limited by loads from memory, not by add latency (and the compiler may vectorize it).
uint64_t sum_read(const uint64_t * p, size_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += p[i + 0]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
        a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
    }
    for (; i < n; ++i) a0 += p[i];
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

struct probe_result {
    double seconds = 0;   // wall time from the common start to the last thread's end
    uint64_t bytes = 0;   // bytes counted by all threads (see bandwidth_probe for the convention)
};

// Runs `pass(thread, slice_begin, slice_words)` over each thread's slice of `words` words, again
// and again, until `seconds` have passed (at least one pass each). Returns the bytes the passes
// moved (pass returns its own count) and the elapsed wall time.
template <typename Pass>
probe_result bandwidth_probe(size_t words, int n_threads, double seconds, Pass pass) {
    const size_t per = words / size_t(n_threads) / 8 * 8;  // whole groups of eight words
    std::atomic<int> ready{0};
    std::atomic<bool> go{false}, cancel{false};
    std::vector<uint64_t> moved(size_t(n_threads), 0);
    std::vector<clock_type::time_point> ended(static_cast<size_t>(n_threads));
    clock_type::time_point start;
    const auto budget = std::chrono::duration<double>(seconds);
    auto worker = [&](int t) {
        ready.fetch_add(1);
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        if (cancel.load()) return;
        uint64_t bytes = 0;
        do {
            bytes += pass(t, size_t(t) * per, per);
        } while (clock_type::now() - start < budget);
        moved[size_t(t)] = bytes;
        ended[size_t(t)] = clock_type::now();
    };
    std::vector<std::thread> pool;
    pool.reserve(size_t(n_threads));
    try {
        for (int t = 0; t < n_threads; ++t) pool.emplace_back(worker, t);
    } catch (const std::system_error & e) {  // no thread left (ulimit, pids cgroup): stop those started
        cancel.store(true);
        go.store(true, std::memory_order_release);
        for (auto & th : pool) th.join();
        throw std::runtime_error("could not start " + std::to_string(n_threads) + " threads (" +
                                 std::to_string(pool.size()) + " started): " + e.what());
    }
    while (ready.load() < n_threads) std::this_thread::yield();
    start = clock_type::now();
    go.store(true, std::memory_order_release);
    for (auto & th : pool) th.join();
    probe_result r;
    clock_type::time_point last = start;
    for (int t = 0; t < n_threads; ++t) {
        r.bytes += moved[size_t(t)];
        if (ended[size_t(t)] > last) last = ended[size_t(t)];
    }
    r.seconds = std::chrono::duration<double>(last - start).count();
    return r;
}

struct free_deleter { void operator()(void * p) const { std::free(p); } };

}  // namespace

void init_bandwidth(nb::module_ & m) {
    m.def("memory_bandwidth", [](uint64_t bytes, int threads, double seconds) {
        if (threads < 1 || threads > 1024) {
            throw std::invalid_argument("threads must be 1..1024, got " + std::to_string(threads));
        }
        if (!(seconds > 0) || seconds > 60) {
            throw std::invalid_argument("seconds must be > 0 and <= 60, got " + std::to_string(seconds));
        }
        const uint64_t min_bytes = uint64_t(threads) * 2 * 8 * 8 * 1024;  // 128 KiB per thread
        if (bytes < min_bytes) {
            throw std::invalid_argument("bytes must be at least " + std::to_string(min_bytes) + " for " +
                                        std::to_string(threads) + " threads, got " + std::to_string(bytes));
        }
        const size_t words = size_t(bytes / 8);
        std::unique_ptr<uint64_t, free_deleter> buf;
        probe_result rd, cp;
        uint64_t sink = 0;
        {
            gil_release nogil;
            buf.reset(static_cast<uint64_t *>(std::malloc(words * 8)));
            if (buf) {
                uint64_t * p = buf.get();
                // touch every page first (first-touch page faults are not bandwidth), from the
                // threads that will read it, so NUMA placement matches the probe
                bandwidth_probe(words, threads, 1e-9, [p](int, size_t b, size_t n) {
                    for (size_t i = 0; i < n; ++i) p[b + i] = b + i;
                    return uint64_t(0);
                });
                std::vector<uint64_t> sums(size_t(threads), 0);
                rd = bandwidth_probe(words, threads, seconds / 2, [p, &sums](int t, size_t b, size_t n) {
                    sums[size_t(t)] += sum_read(p + b, n);
                    return uint64_t(n * 8);
                });
                for (uint64_t s : sums) sink += s;
                // copy: each thread's slice, first half to second half; counted as bytes read
                // plus bytes written (2 x the bytes copied), the STREAM convention
                cp = bandwidth_probe(words, threads, seconds / 2, [p](int, size_t b, size_t n) {
                    std::memcpy(p + b + n / 2, p + b, n / 2 * 8);
                    return uint64_t(n / 2 * 8 * 2);
                });
            }
        }
        if (!buf) throw std::bad_alloc();  // -> MemoryError
        nb::dict out;
        out["read_gbs"] = rd.seconds > 0 ? double(rd.bytes) / rd.seconds / 1e9 : 0.0;
        out["copy_gbs"] = cp.seconds > 0 ? double(cp.bytes) / cp.seconds / 1e9 : 0.0;
        out["bytes"] = uint64_t(words) * 8;
        out["threads"] = threads;
        out["seconds"] = rd.seconds + cp.seconds;
        out["checksum"] = sink;  // the read sums, so the compiler cannot drop the loads
        return out;
    }, nb::arg("bytes"), nb::arg("threads"), nb::arg("seconds") = 1.0,
    R"(Measure memory bandwidth over a buffer of ``bytes`` bytes with ``threads`` threads.

Args:
    bytes: buffer size; make it much larger than the last-level cache (it is allocated, touched,
        then freed). MemoryError when it cannot be allocated.
    threads: worker threads, each owning one slice of the buffer.
    seconds: total time, half for the read probe and half for the copy probe.

Returns:
    dict with read_gbs (uint64 sum over the buffer, GB/s = 1e9 bytes/s), copy_gbs (memcpy of
    each slice's first half to its second half, counted as bytes read + bytes written, as STREAM
    does), bytes, threads, seconds (time measured) and checksum (the read sum).)");
}

}  // namespace lamina
