// Generation threads that adapt to busy CPUs. ggml's workers meet at a barrier for every op of a
// graph. When another thread or process keeps a CPU busy, the kernel deschedules one of lamina's
// workers now and then, and all the others wait out a time slice at the next barrier. Measured
// beside one spinning process: Gemma 3 270M on 2 CPUs keeps 24 ms steps with one of 100-200 ms
// every ten or so; a 1B model with 16 threads on 16 CPUs stalls at every step (268 ms against
// 18 ms alone, 26 ms with 15 threads).
//
// So the tuner judges blocks of one-token steps at the current count (16 steps and 100 ms, or 4
// steps and 500 ms) and runs a block with one thread fewer when one of these holds:
//   - the block stalled: more than a sixth of its time went to steps beyond twice its median;
//   - its mean step is 1.5 times the best block's at this count in this context;
//   - the process knows nothing yet (no context judged a block at the full count in the last
//     30 s): one try.
// It moves when the tried block's mean is 5 % lower; after a try that was not, 1, 3, 7 .. 64 slow
// blocks pass before the next. Now and then, ever more rarely, it tries one thread more (the
// neighbour may have left); that try ends at its first stall, and moves when its block did not
// stall and was not slower. The count chosen, and when to try more, are the process's (a busy CPU
// outlives a context): a new context starts there, and one made after 30 s without a judgement
// tries one more at its first block. A count
// alone on its CPUs does not stall and pays one try per process. Only lamina's default count
// adapts; an explicit one is obeyed as given. A count changed mid-generation leaves the text as it
// was: the CPU's ops give the same bits with any thread count (flash attention since patch 0004;
// tests/test_threads.py). The pool sleeps at once between graphs (poll 0), so workers left out do
// not spin on the CPUs they freed. Used under the context lease (engine steps).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace lamina {

class thread_tuner {
public:
    // max: the generation pool's threads (the default count); 0 switches the tuner off. batch: the
    // batch pool's, when lamina chose it too (else -1): it leaves out as many threads as generation.
    void reset(int max, int batch) {
        max_ = cur_ = max;
        batch_ = batch;
        why_ = max > 0 ? "the default: no step has stalled on a busy CPU" : "";
        try_ = skip_ = skips_ = 0;
        best_.clear();
        at_cur_.clear();
        at_try_.clear();
        std::lock_guard<std::mutex> lk(shared().mu);
        const process & p = shared().p;
        // A count chosen long ago still holds (a busy CPU outlives a pause): the tries up find out
        // whether the neighbour left, at one stalled step each; starting at the full count instead
        // costs a block of stalled steps (4 at 320 ms each: the 1B model on 16 CPUs beside a spinner).
        const bool recent = p.max == max && clock::now() - p.judged < std::chrono::seconds(30);
        if (p.max == max && p.cur < max) {
            cur_ = p.cur;
            why_ = p.why + "; found by a context of this process";
            if (!recent) {  // the neighbour may have left meanwhile: try one more at the first block
                shared().p.up_wait = std::chrono::milliseconds(500);
                shared().p.next_up = clock::now();
            }
        }
        fresh_ = cur_ == max && !recent;
    }
    // In a child after fork(): the mutex may have been held by a thread that does not exist there.
    static void after_fork() { shared_ptr() = new shared_state; }
    bool on() const { return max_ > 1; }
    const std::string & why() const { return why_; }
    // The thread count for the next one-token step, and the one chosen (not a try's).
    int next() const { return try_ > 0 ? try_ : cur_; }
    int chosen() const { return cur_; }
    // The thread count for multi-token steps (`configured` when lamina did not choose it).
    int batch(int configured) const { return batch_ < 0 ? configured : std::max(1, batch_ - (max_ - cur_)); }

    // The time of a one-token step run with next() threads.
    void took(int64_t us) {
        if (!on()) return;
        const auto now = clock::now();
        if (try_ == 0) {
            at_cur_.add(us);
            if (!at_cur_.full(16, 100000) && !at_cur_.full(4, 500000)) return;
            double & best = best_.emplace(cur_, at_cur_.mean()).first->second;
            const bool slow = at_cur_.stalled() || at_cur_.mean() > 1.5 * best;
            best = std::min(best, at_cur_.mean());
            std::lock_guard<std::mutex> lk(shared().mu);
            process & p = mine();
            if (cur_ > 1 && (fresh_ || (slow && --skip_ < 0))) {
                try_ = cur_ - 1;
            } else if (cur_ < max_ && now >= p.next_up) {
                try_ = cur_ + 1;
                stall_ = 3 * at_cur_.median();
            } else {
                at_cur_.clear();  // judged: the next block
            }
            fresh_ = false;
            if (p.cur == cur_) p.judged = now;
            return;
        }
        at_try_.add(us);
        const bool down = try_ < cur_;
        const bool lost = !down && us > stall_;  // one thread more stalled at once: its CPU is still busy
        if (!lost && !(down ? at_try_.full(8, 50000) || at_try_.full(3, 300000) : at_try_.full(16, 100000))) return;
        const double tried = at_try_.mean(), base = at_cur_.mean();
        std::lock_guard<std::mutex> lk(shared().mu);
        process & p = mine();
        // down: 5 % faster. Up: no stall and not slower (one thread more gains at most 1/cur, 6 % at
        // 16, so asking for 10 % would keep a count forever once the neighbour left).
        if (!lost && (down ? tried < base * 0.95 : tried <= base && !at_try_.stalled())) {
            why_ = std::to_string(try_) + " threads, not " + std::to_string(cur_) + ": steps took " +
                   std::to_string(int64_t(tried)) + " us on average with " + std::to_string(try_) + ", " +
                   std::to_string(int64_t(base)) + " us with " + std::to_string(cur_) +
                   (down ? " (a CPU is busy with other work: threads stalled at barriers)" : " (the CPUs are free again)");
            cur_ = try_;
            p.cur = cur_;
            p.why = why_;
            if (down) p.up_wait = std::min(2 * p.up_wait, clock::duration(std::chrono::seconds(64)));  // after a wrong move up too
            p.next_up = now + p.up_wait;
            skip_ = skips_ = 0;
        } else if (down) {  // not faster: let that many more slow blocks pass next time
            skip_ = skips_ = std::min(2 * skips_ + 1, 64);
        } else {  // try up again later, ever more rarely
            p.up_wait = std::min(2 * p.up_wait, clock::duration(std::chrono::seconds(64)));
            p.next_up = now + p.up_wait;
        }
        p.judged = now;
        try_ = 0;
        at_cur_.clear();
        at_try_.clear();
    }

private:
    using clock = std::chrono::steady_clock;
    struct process {  // what the process knows (the last context to judge wins)
        int max = 0, cur = 0;
        std::string why;
        clock::time_point judged, next_up;
        clock::duration up_wait = std::chrono::milliseconds(500);
    };
    struct shared_state {
        std::mutex mu;  // a leaf: never held across a call out
        process p;
    };
    static shared_state *& shared_ptr() {
        static shared_state * s = new shared_state;  // never destroyed: contexts may outlive static destruction
        return s;
    }
    static shared_state & shared() { return *shared_ptr(); }
    // The process's record for this pool size (shared().mu held): another size's starts anew.
    process & mine() const {
        process & p = shared().p;
        if (p.max != max_) p = process(), p.max = p.cur = max_;
        return p;
    }
    struct block {  // one-token step times
        std::vector<int64_t> t;
        int64_t sum = 0;
        void add(int64_t us) { t.push_back(us), sum += us; }
        void clear() { t.clear(), sum = 0; }
        bool full(size_t steps, int64_t us) const { return t.size() >= steps && sum >= us; }
        double mean() const { return double(sum) / double(t.size()); }
        int64_t median() const {
            std::vector<int64_t> v = t;
            std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
            return v[v.size() / 2];
        }
        // More than a sixth of the time went to steps beyond twice the median (workers waited out
        // a time slice at a barrier).
        bool stalled() const {
            const int64_t twice = 2 * median();
            int64_t excess = 0;
            for (int64_t x : t) excess += std::max<int64_t>(0, x - twice);
            return excess * 6 > sum;
        }
    };

    int max_ = 0, cur_ = 0, try_ = 0;  // try_: the count being tried (0: none)
    int batch_ = -1;
    bool fresh_ = false;  // the process knew nothing when this context started: try one fewer once
    int64_t stall_ = 0;   // a step of a try up that takes longer stalled
    int skip_ = 0, skips_ = 0;  // slow blocks to let pass before the next try down, and after the last failed one
    std::map<int, double> best_;  // the best block mean per count, in this context
    block at_cur_, at_try_;  // the block at cur_, and the try's
    std::string why_;
};

}  // namespace lamina
