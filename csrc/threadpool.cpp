// A small persistent thread pool: workers sleep on a condition variable between requests (no
// spinning, so a shared machine's other work is not starved), tasks are claimed with an atomic
// counter, and the calling thread works too. One parallel_for at a time (a mutex); requests
// from several Python threads queue here rather than oversubscribing the cores. Safe across
// fork(): a child process starts with a new, empty pool.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SRP4CTR_HAVE_ATFORK 1
#endif

#include "tower.h"

namespace srp4ctr {
namespace {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
      ++generation_;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int n_tasks, int threads, void (*fn)(void*, int, int), void* ctx) {
    if (n_tasks <= 0) return;
    threads = std::max(1, std::min(threads, n_tasks));
    if (threads == 1) {
      for (int t = 0; t < n_tasks; ++t) fn(ctx, t, 0);
      return;
    }
    std::lock_guard<std::mutex> call(call_mu_);
    grow(threads - 1);
    {
      std::lock_guard<std::mutex> g(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_tasks_ = n_tasks;
      active_ = threads - 1;  // workers 1..threads-1 take part
      next_.store(0);
      pending_ = threads - 1;
      ++generation_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> g(mu_);
    done_cv_.wait(g, [&] { return pending_ == 0; });
  }

 private:
  // Called before the generation is advanced: a new worker starts from the current one, so it
  // cannot miss the request it was created for however late it is scheduled.
  void grow(int n) {
    uint64_t current;
    {
      std::lock_guard<std::mutex> g(mu_);
      current = generation_;
    }
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id, current] { loop(id, current); });
    }
  }

  void work(int id) {
    for (int t = next_.fetch_add(1); t < n_tasks_; t = next_.fetch_add(1)) fn_(ctx_, t, id);
  }

  void loop(int id, uint64_t seen) {
    for (;;) {
      bool take_part;
      {
        std::unique_lock<std::mutex> g(mu_);
        cv_.wait(g, [&] { return generation_ != seen; });
        seen = generation_;
        if (stop_) return;
        take_part = id <= active_;
      }
      if (!take_part) continue;
      work(id);
      {
        std::lock_guard<std::mutex> g(mu_);
        if (--pending_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  void (*fn_)(void*, int, int) = nullptr;
  void* ctx_ = nullptr;
  int n_tasks_ = 0, active_ = 0, pending_ = 0;
  std::atomic<int> next_{0};
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Never destroyed: workers may outlive static destruction order.
Pool* g_pool = nullptr;
std::once_flag g_pool_once;

#ifdef SRP4CTR_HAVE_ATFORK
// A forked child inherits the pool's bookkeeping (workers, perhaps a locked mutex) but none of
// its threads: it gets a fresh pool, and the inherited one is abandoned (its std::thread objects
// name threads of the parent and must not be joined or destroyed here).
void fresh_pool_in_child() { g_pool = new Pool(); }
#endif

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool = new Pool();
#ifdef SRP4CTR_HAVE_ATFORK
    pthread_atfork(nullptr, nullptr, fresh_pool_in_child);
#endif
  });
  return *g_pool;
}

}  // namespace

void parallel_for(int n_tasks, int threads, void (*fn)(void*, int, int), void* ctx) {
  pool().run(n_tasks, threads, fn, ctx);
}

}  // namespace srp4ctr
