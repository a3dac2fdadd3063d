// Generation threads that adapt to busy CPUs. ggml's workers meet at a barrier for every op of a
// graph, so a worker the kernel deschedules (its CPU is busy with other work: a thread of the same
// process, another process) stalls all the others for a time slice, and beside a busy neighbour the
// default thread count is slower than fewer threads. The tuner measures instead of guessing: it
// times the engine's one-token steps at the current count and now and then runs two steps with one
// thread fewer (after a move down, also one more); it moves when both are 10 % faster. The first
// try comes after the first step, then ever more rarely while nothing changes, and at once when
// the steps slow down by a quarter (a neighbour started). It runs only for lamina's default count;
// an explicit one is obeyed as given. Used under the context lease (engine steps).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

namespace lamina {

class thread_tuner {
public:
    // max: the generation pool's threads (the default count); 0 switches the tuner off
    void reset(int max) {
        max_ = cur_ = max;
        moved(max > 0 ? "the default: no step has shown a busy CPU" : "");
    }
    bool on() const { return max_ > 1; }
    const std::string & why() const { return why_; }
    // The thread count for the next one-token step.
    int next() const { return try_ > 0 ? try_ : cur_; }

    // The time of a one-token step run with next() threads.
    void took(int64_t us) {
        if (!on()) return;
        if (try_ == 0) {
            recent_.push_back(us);
            if (recent_.size() > 8) recent_.erase(recent_.begin());
            ++since_down_;
            ++since_up_;
            const int64_t now = median(recent_);
            if (recent_.size() == 8 && now > best_ + best_ / 4) since_down_ = wait_down_ = 1;  // slower: look now
            best_ = std::min(best_, now);
            if (cur_ < max_ && since_up_ >= wait_up_) try_ = cur_ + 1;
            else if (cur_ > 1 && since_down_ >= wait_down_) try_ = cur_ - 1;
            return;
        }
        tried_.push_back(us);
        if (tried_.size() < 2) return;
        const int64_t cand = std::max(tried_[0], tried_[1]), base = median(recent_);
        const bool down = try_ < cur_;
        if (cand * 10 < base * 9) {
            const int was = cur_;
            cur_ = try_;
            moved(std::to_string(cur_) + " threads, not " + std::to_string(was) + ": a step took " + std::to_string(cand) +
                  " us with " + std::to_string(cur_) + ", " + std::to_string(base) + " us with " + std::to_string(was) +
                  (down ? " (a CPU is busy with other work)" : ""));
            return;
        }
        if (down) {  // not faster: try again later, more rarely
            wait_down_ = std::min(wait_down_ * 8, 1024);
            since_down_ = 0;
        } else {
            wait_up_ = std::min(wait_up_ * 2, 1024);
            since_up_ = 0;
        }
        best_ = base;
        try_ = 0;
        tried_.clear();
    }

private:
    void moved(std::string why) {
        why_ = std::move(why);
        try_ = 0;
        recent_.clear();
        tried_.clear();
        best_ = INT64_MAX;
        wait_down_ = 1;  // down: at once (another busy CPU); up (the neighbour left): later
        wait_up_ = 64;
        since_down_ = since_up_ = 0;
    }
    static int64_t median(std::vector<int64_t> v) {
        std::nth_element(v.begin(), v.begin() + std::ptrdiff_t(v.size() / 2), v.end());
        return v[v.size() / 2];
    }

    int max_ = 0, cur_ = 0, try_ = 0;  // try_: the count being tried (0: none)
    int wait_down_ = 1, wait_up_ = 64, since_down_ = 0, since_up_ = 0;  // steps at cur_ before a try
    int64_t best_ = INT64_MAX;  // the fastest median of recent steps at cur_
    std::vector<int64_t> recent_, tried_;
    std::string why_;
};

}  // namespace lamina
