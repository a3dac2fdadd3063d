// Generation threads that adapt to busy CPUs. ggml's workers meet at a barrier for every op of a
// graph. When another thread or process keeps a CPU busy, the kernel now and then deschedules one
// of lamina's workers, and all the others wait at the next barrier for a time slice: most steps
// keep their speed, a few take 4-8 times as long (measured: Gemma 3 270M on 2 CPUs beside one
// spinning process, 24 ms steps and one of 100-200 ms every ten or so). Fewer threads then win on
// average although they lose on the median.
//
// So the tuner watches for those stalls instead of timing tries blindly. It judges blocks of steps
// at the current count (at least 16 steps and 100 ms, so one hiccup of the OS is not a pattern):
// when a block is stalled (more than a sixth of its time spent beyond twice its median), it runs a
// block with one thread fewer and moves when that block's mean step is clearly lower. Now and
// then, ever more rarely, it tries one thread more (the neighbour may have left); that try ends at
// its first stall. A count alone on its CPUs does not stall, so it pays no tries. A busy CPU
// outlives one context: a new context starts at the count another one chose in the last 30 s.
// Only lamina's default count adapts; an explicit one is obeyed as given (a different count can
// change the last bits of the logits, so bit-for-bit repeatable output needs an explicit count).
// The pool sleeps at once between graphs (poll 0), so workers left out do not spin on the CPUs
// they freed. Used under the context lease (engine steps).
#pragma once

#include <algorithm>
#include <chrono>
#include <mutex>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace lamina {

class thread_tuner {
public:
    // max: the generation pool's threads (the default count); 0 switches the tuner off
    void reset(int max) {
        max_ = cur_ = max;
        why_ = max > 0 ? "the default: no step has stalled on a busy CPU" : "";
        wait_up_ = wait_down_ = 0;
        clear();
        std::lock_guard<std::mutex> lk(shared().mu);
        const choice & c = shared().last;
        const auto age = std::chrono::duration_cast<std::chrono::seconds>(clock::now() - c.when).count();
        if (max > 1 && c.max == max && c.cur < max && age < 30) {
            cur_ = c.cur;
            wait_up_ = c.wait_up;
            why_ = c.why + "; found by another context " + std::to_string(age) + " s ago";
        }
    }
    bool on() const { return max_ > 1; }
    const std::string & why() const { return why_; }
    // The thread count for the next one-token step.
    int next() const { return try_ > 0 ? try_ : cur_; }

    // The time of a one-token step run with next() threads.
    void took(int64_t us) {
        if (!on()) return;
        if (try_ == 0) {
            at_cur_.add(us);
            if (!at_cur_.full(16, 100000)) return;
            since_ += int(at_cur_.t.size());
            if (cur_ > 1 && since_ >= wait_down_ && at_cur_.stalled()) try_ = cur_ - 1;
            else if (cur_ < max_ && since_ >= wait_up_) try_ = cur_ + 1, stall_ = 3 * at_cur_.median();
            else at_cur_.clear();  // judged: the next block
            return;
        }
        at_try_.add(us);
        const bool down = try_ < cur_;
        // one thread more stalled at once: the CPU it took is still busy
        const bool lost = !down && us > stall_;
        if (!lost && !(down ? at_try_.full(8, 50000) : at_try_.full(16, 100000))) return;
        const double tried = at_try_.mean(), base = at_cur_.mean();
        if (!lost && tried < base * (down ? 0.95 : 0.9)) {
            why_ = std::to_string(try_) + " threads, not " + std::to_string(cur_) + ": steps took " +
                   std::to_string(int64_t(tried)) + " us on average with " + std::to_string(try_) + ", " +
                   std::to_string(int64_t(base)) + " us with " + std::to_string(cur_) +
                   (down ? " (a CPU is busy with other work: threads stalled at barriers)" : " (the CPUs are free again)");
            cur_ = try_;
            wait_up_ = 64;
            wait_down_ = 0;
        } else {  // not faster: try that way again later, ever more rarely
            int & wait = down ? wait_down_ : wait_up_;
            wait = std::min(std::max(2 * wait, 32), 1024);
        }
        clear();
        std::lock_guard<std::mutex> lk(shared().mu);
        shared().last = choice{max_, cur_, wait_up_, clock::now(), why_};
    }

private:
    using clock = std::chrono::steady_clock;
    struct choice {
        int max = 0, cur = 0, wait_up = 0;
        clock::time_point when;
        std::string why;
    };
    struct last_choice {
        std::mutex mu;  // a leaf: held for a copy, never across a call out
        choice last;
    };
    static last_choice & shared() {
        static last_choice * s = new last_choice;  // never destroyed: contexts may outlive static destruction
        return *s;
    }
    void clear() {
        try_ = since_ = 0;
        at_cur_.clear();
        at_try_.clear();
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
    int64_t stall_ = 0;  // a step of a try up that takes longer stalled
    int wait_down_ = 0, wait_up_ = 0, since_ = 0;  // steps at cur_ before a try down / up, and so far
    block at_cur_, at_try_;  // the block at cur_, and the try's
    std::string why_;
};

}  // namespace lamina
