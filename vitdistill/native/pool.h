// Work split over XLA's intra-op thread pool for the custom calls in this folder.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace vitdistill {

// Runs run(i) for i in [0, blocks): the calling thread and blocks - 1 tasks on `pool` each claim the next
// unclaimed block until none is left, so a pool busy with other work leaves the blocks to the caller
// rather than making it wait; returns when every block has run. Tasks that start after the return find
// nothing to claim (they share only the counters, never `run`'s captures).
template <typename Run>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t blocks, const Run& run) {
  if (blocks <= 0) return;
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto counters = std::make_shared<Counters>();
  // The tasks hold the counters but reach `run` only through this pointer, which they read only while a
  // block is unclaimed, that is before the wait below ends.
  auto shared = std::make_shared<std::pair<std::shared_ptr<Counters>, const Run*>>(counters, &run);
  auto claim = [blocks](Counters& c, const Run* r) {
    for (int64_t i; (i = c.next.fetch_add(1)) < blocks;) {
      (*r)(i);
      c.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < blocks; ++t) {
    pool.Schedule([shared, blocks, claim] {
      Counters& c = *shared->first;
      if (c.next.load() >= blocks) return;
      claim(c, shared->second);
    });
  }
  claim(*counters, &run);
  while (counters->done.load(std::memory_order_acquire) < blocks) std::this_thread::yield();
}

// How many blocks `items` of `cost` each should be split into on `pool`: one below `serial_below` in total.
inline int64_t Blocks(xla::ffi::ThreadPool& pool, int64_t items, int64_t cost, int64_t serial_below) {
  if (items <= 0) return 0;
  int64_t threads = items * cost < serial_below ? 1 : pool.num_threads();
  if (threads < 1) threads = 1;
  return threads < items ? threads : items;
}

}  // namespace vitdistill
