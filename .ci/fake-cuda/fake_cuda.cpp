// A CPU stand-in for the CUDA driver, cuBLAS and NCCL: the subset this crate's host code
// (src/cuda/, through cudarc) calls, with our kernels run by the emulator (kernels/emulator.cpp).
// CI only; never part of the published crate. Built by .ci/fake-cuda/build, which installs this
// one shared object under every library name cudarc and our probes load (libcuda.so.1,
// libcublas.so.13, libnccl.so.2, ...): loaded once, so the driver, cuBLAS and NCCL share one
// table of allocations. docs/gpu.md says what it proves and what it cannot.
//
// Device memory is host memory in a table of live allocations, and every pointer a call
// receives is checked with its extent, at the call and again when the stream runs the work:
// out of bounds, freed, another device's, or never allocated (a host pointer) is
// CUDA_ERROR_ILLEGAL_ADDRESS plus one line on stderr naming the call, the argument and the
// allocation. Like a real fault it is sticky: every later call in that context fails.
// New allocations are filled with 0xFF bytes (NaN in every float type, 0xFFFFFFFF in a ticket)
// and freed ones are poisoned the same way and quarantined, so a read of memory nobody wrote,
// or of freed memory, gives garbage rather than plausible data.
//
// Streams are in-order queues, each drained by its own worker thread, so work runs
// concurrently with the host and with other streams as on a GPU: events complete when the
// queue reaches them, cuStreamWaitEvent and the synchronise calls really wait, frees are
// stream-ordered, host-to-device copies of pageable memory return once the source is staged,
// device-to-host copies return when done. On top of that every access is checked against the
// happens-before order of streams, events and host synchronisation (vector clocks, see `Clock`),
// so a missing wait is reported whichever stream happened to run first, not only when the
// timing exposes it. FAKE_CUDA_IMMEDIATE=1 runs everything on the calling thread.
//
// Environment: FAKE_CUDA_DEVICES (8), FAKE_CUDA_SMS (132), FAKE_CUDA_MEM_GIB (80),
// FAKE_CUDA_BLOCKS_AT_ONCE (1: serial emulation; up to 4), FAKE_CUDA_SEED, FAKE_CUDA_IMMEDIATE,
// FAKE_CUDA_LAUNCH_DELAY_US (1000: each kernel starts that late on its stream, so work on
// another stream that was not made to wait for it runs first), FAKE_CUDA_ORDER_CHECK (1),
// FAKE_CUDA_LOG=path (every call
// with its arguments), FAKE_CUDA_ABORT=1 (abort on the first fault instead of a sticky error).
// Counts of calls: fake_cuda_call_count(name) (the process's), fake_cuda_thread_call_count(name)
// (the calling thread's); fake_cuda_abort_next_launch(blocks) (the calling thread's next launch).
// Event timing is host time and means nothing.

#include "emulator.cpp"

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
enum : CUresult {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace fake {

// ---------------------------------------------------------------- configuration and the log

long env_long(const char *name, long fallback) {
    const char *v = std::getenv(name);
    return v && *v ? std::strtol(v, nullptr, 10) : fallback;
}

struct Config {
    int devices = (int)env_long("FAKE_CUDA_DEVICES", 8);
    int sms = (int)env_long("FAKE_CUDA_SMS", 132);
    uint64_t mem = (uint64_t)env_long("FAKE_CUDA_MEM_GIB", 80) << 30;
    unsigned blocks_at_once = (unsigned)env_long("FAKE_CUDA_BLOCKS_AT_ONCE", 1);
    uint64_t seed = (uint64_t)env_long("FAKE_CUDA_SEED", 1);
    bool immediate = env_long("FAKE_CUDA_IMMEDIATE", 0) != 0;
    long launch_delay_us = env_long("FAKE_CUDA_LAUNCH_DELAY_US", 1000);
    bool abort_on_fault = env_long("FAKE_CUDA_ABORT", 0) != 0;
    FILE *log = nullptr;
    Config() {
        if (const char *p = std::getenv("FAKE_CUDA_LOG"); p && *p) log = std::fopen(p, "a");
    }
};
Config &cfg() {
    static Config c;
    return c;
}

std::mutex counts_mu;
std::unordered_map<std::string, uint64_t> &counts() {
    static std::unordered_map<std::string, uint64_t> c;
    return c;
}

// Calls made by this thread (tests run in parallel in one process: each counts its own).
thread_local std::unordered_map<std::string, uint64_t> thread_counts;

// Counts the call and, with FAKE_CUDA_LOG, writes it with its arguments.
void called(const char *name, const char *fmt = "", ...) {
    ++thread_counts[name];
    std::lock_guard<std::mutex> g(counts_mu);
    ++counts()[name];
    if (FILE *f = cfg().log) {
        std::fprintf(f, "%s(", name);
        va_list ap;
        va_start(ap, fmt);
        std::vfprintf(f, fmt, ap);
        va_end(ap);
        std::fprintf(f, ")\n");
        std::fflush(f);
    }
}

// ---------------------------------------------------------------- contexts and faults

struct Stream;
struct Ctx {
    int dev = 0;
    int retained = 0;
    std::atomic<int> sticky{0}; // a fault: every later call fails with it, as on a GPU
    Stream *null_stream = nullptr;
    std::set<Stream *> streams;
};

std::mutex handles_mu; // guards the handle tables (contexts, streams, events, modules)
std::vector<Ctx *> &contexts() {
    static std::vector<Ctx *> v = [] {
        std::vector<Ctx *> c;
        for (int d = 0; d < cfg().devices; ++d) {
            c.push_back(new Ctx());
            c.back()->dev = d;
        }
        return c;
    }();
    return v;
}
thread_local Ctx *current = nullptr;
bool initialised = false;

CUresult fault(Ctx *ctx, CUresult code, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "fake-cuda: %s\n", line);
    if (cfg().log) {
        std::lock_guard<std::mutex> g(counts_mu);
        std::fprintf(cfg().log, "FAULT %s\n", line);
        std::fflush(cfg().log);
    }
    if (cfg().abort_on_fault) std::abort();
    if (ctx && code == CUDA_ERROR_ILLEGAL_ADDRESS) {
        int zero = 0;
        ctx->sticky.compare_exchange_strong(zero, code);
    }
    return code;
}

// ---------------------------------------------------------------- memory

struct Alloc {
    size_t size = 0;
    int dev = 0;
    bool live = true;
    bool pooled = false; // cuMemAllocAsync: counted in the device's pool
    const char *freed_by = "";
    // Ordering check (see `ordered_access`): the last writer and the last read of each stream,
    // as (stream, sequence number on it).
    const void *writer = nullptr;
    uint64_t written = 0;
    std::vector<std::pair<const void *, uint64_t>> reads;
};
std::mutex mem_mu;
std::map<uintptr_t, Alloc> allocs;
std::deque<uintptr_t> quarantine;
size_t quarantine_bytes = 0;
struct PoolStats {
    uint64_t used = 0, used_high = 0, live = 0;
} pools[64];
constexpr size_t QUARANTINE_LIMIT = size_t(1) << 30;

void poison(void *p, size_t n) { std::memset(p, 0xFF, n); }

// Checks that [p, p + bytes) lies inside one live allocation of device `dev`; the empty range
// is always valid. On failure returns a description for the fault line.
std::string check_range(uintptr_t p, size_t bytes, int dev) {
    if (bytes == 0) return {};
    std::lock_guard<std::mutex> g(mem_mu);
    auto it = allocs.upper_bound(p);
    if (it == allocs.begin()) return "not device memory (never allocated: a host pointer?)";
    --it;
    const uintptr_t base = it->first;
    const Alloc &a = it->second;
    char buf[256];
    if (p > base + a.size) {
        std::snprintf(buf, sizeof buf, "not device memory (nearest allocation 0x%" PRIxPTR " of %zu bytes ends below it)",
                      base, a.size);
        return buf;
    }
    if (!a.live) {
        std::snprintf(buf, sizeof buf, "in allocation 0x%" PRIxPTR " of %zu bytes, freed by %s", base, a.size, a.freed_by);
        return buf;
    }
    if (a.dev != dev) {
        std::snprintf(buf, sizeof buf, "in allocation 0x%" PRIxPTR " of device %d, used on device %d", base, a.dev, dev);
        return buf;
    }
    if (p - base > a.size || bytes > a.size - (p - base)) {
        std::snprintf(buf, sizeof buf, "bytes [%zu, %zu) of allocation 0x%" PRIxPTR " of %zu bytes", (size_t)(p - base),
                      (size_t)(p - base) + bytes, base, a.size);
        return buf;
    }
    return {};
}

// One checked buffer of a call: its name, address and extent in bytes.
struct Buffer {
    const char *name;
    uintptr_t ptr;
    size_t bytes;
    bool write = false; // for the ordering check (a read otherwise)
};

CUresult check_buffers(Ctx *ctx, const char *call, const std::vector<Buffer> &bufs) {
    for (const Buffer &b : bufs) {
        std::string why = check_range(b.ptr, b.bytes, ctx->dev);
        if (!why.empty())
            return fault(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, "%s: %s = 0x%" PRIxPTR " (%zu bytes): %s", call, b.name, b.ptr,
                         b.bytes, why.c_str());
    }
    return CUDA_SUCCESS;
}

uintptr_t allocate(size_t bytes, int dev, bool pooled) {
    void *p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
    if (!p) return 0;
    poison(p, bytes);
    std::lock_guard<std::mutex> g(mem_mu);
    Alloc a;
    a.size = bytes;
    a.dev = dev;
    a.pooled = pooled;
    allocs[(uintptr_t)p] = std::move(a);
    if (pooled) {
        PoolStats &s = pools[dev];
        s.used += bytes;
        s.used_high = std::max(s.used_high, s.used);
    }
    pools[dev].live += bytes;
    return (uintptr_t)p;
}

CUresult release(Ctx *ctx, uintptr_t p, const char *call) {
    std::unique_lock<std::mutex> g(mem_mu);
    auto it = allocs.find(p);
    if (it == allocs.end() || !it->second.live) {
        const char *why = it == allocs.end() ? "not the start of an allocation" : "already freed";
        g.unlock();
        return fault(ctx, CUDA_ERROR_INVALID_VALUE, "%s: 0x%" PRIxPTR " is %s", call, p, why);
    }
    Alloc &a = it->second;
    a.live = false;
    a.freed_by = call;
    if (a.pooled) pools[a.dev].used -= a.size;
    pools[a.dev].live -= a.size;
    poison((void *)p, a.size);
    quarantine.push_back(p);
    quarantine_bytes += a.size;
    while (quarantine_bytes > QUARANTINE_LIMIT && quarantine.size() > 1) {
        auto old = allocs.find(quarantine.front());
        quarantine.pop_front();
        quarantine_bytes -= old->second.size;
        std::free((void *)old->first);
        allocs.erase(old);
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- streams and events

// The work running on this worker thread: its stream, sequence number and clock (`Clock`).
using Clock = std::unordered_map<const void *, uint64_t>;
thread_local const void *running_stream = nullptr;
thread_local uint64_t running_seq = 0;
thread_local const Clock *running_clock = nullptr;

struct Stream {
    Ctx *ctx;
    bool blocking; // synchronises with the legacy default stream (flags 0)
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> queue;
    uint64_t enqueued = 0, completed = 0;
    bool stop = false;
    std::thread worker;

    Stream(Ctx *c, bool b) : ctx(c), blocking(b) {
        if (!cfg().immediate) worker = std::thread([this] { drain(); });
    }
    void drain() {
        std::unique_lock<std::mutex> l(mu);
        for (;;) {
            cv.wait(l, [this] { return stop || !queue.empty(); });
            if (queue.empty()) return;
            auto op = std::move(queue.front());
            running_stream = this;
            running_seq = completed + 1;
            l.unlock();
            op();
            l.lock();
            queue.pop_front();
            ++completed;
            cv.notify_all();
        }
    }
    // Enqueues `op`; returns its sequence number (complete when completed >= it).
    uint64_t push(std::function<void()> op) {
        if (cfg().immediate) {
            running_stream = this;
            {
                std::lock_guard<std::mutex> l(mu);
                running_seq = enqueued + 1;
            }
            op();
            std::lock_guard<std::mutex> l(mu);
            ++completed;
            return ++enqueued;
        }
        std::lock_guard<std::mutex> l(mu);
        queue.push_back(std::move(op));
        cv.notify_all();
        return ++enqueued;
    }
    void wait_for(uint64_t seq) {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [&] { return completed >= seq; });
    }
    bool done(uint64_t seq) {
        std::lock_guard<std::mutex> l(mu);
        return completed >= seq;
    }
    uint64_t tail() {
        std::lock_guard<std::mutex> l(mu);
        return enqueued;
    }
    ~Stream() {
        {
            std::lock_guard<std::mutex> l(mu);
            stop = true;
            cv.notify_all();
        }
        if (worker.joinable()) worker.join();
    }
};

// Happens-before between streams, as vector clocks (stream -> sequence number): what a stream's
// next work is ordered after (its own earlier work, the events it waited for, what the host had
// seen complete when it enqueued). Every access a stream's work makes is checked against the
// last writer (and, for a write, the last readers) of the allocation: an access that is not
// ordered after them is reported whatever the timing was, so a missing wait cannot pass by luck.
std::mutex clock_mu; // guards every stream's and event's clock
thread_local Clock host_clock; // what this host thread has seen complete
std::unordered_map<const void *, Clock> stream_clocks;

void join(Clock &into, const Clock &from) {
    for (const auto &[k, v] : from) {
        uint64_t &x = into[k];
        if (x < v) x = v;
    }
}


struct Event {
    Stream *stream = nullptr; // of the last record
    uint64_t seq = 0;
    std::atomic<double> ms{0.0};
    Clock clock; // the recording stream's clock at the record (under clock_mu)
};
std::set<Stream *> all_streams;
std::set<Event *> all_events;

bool check_order = env_long("FAKE_CUDA_ORDER_CHECK", 1) != 0;

// The ordering check of one access by the work running on this thread (see `Clock`): returns
// a description of the unordered earlier access, or nothing. Updates the allocation's record.
std::string ordered_access(const Buffer &b) {
    if (!check_order || !running_clock || b.bytes == 0) return {};
    std::lock_guard<std::mutex> g(mem_mu);
    auto it = allocs.upper_bound(b.ptr);
    if (it == allocs.begin()) return {};
    --it;
    Alloc &a = it->second;
    auto ordered = [](const void *stream, uint64_t seq) {
        if (stream == nullptr || stream == running_stream || seq == 0) return true;
        auto c = running_clock->find(stream);
        return c != running_clock->end() && c->second >= seq;
    };
    char buf[320];
    if (!ordered(a.writer, a.written)) {
        std::snprintf(buf, sizeof buf, "%s allocation 0x%" PRIxPTR " last written by stream %p's work #%llu, which this "
                      "stream (%p, work #%llu) was never made to wait for (a missing event wait or synchronisation)",
                      b.write ? "writes" : "reads", it->first, a.writer, (unsigned long long)a.written, running_stream,
                      (unsigned long long)running_seq);
        return buf;
    }
    if (b.write) {
        for (const auto &[stream, seq] : a.reads)
            if (!ordered(stream, seq)) {
                std::snprintf(buf, sizeof buf, "overwrites allocation 0x%" PRIxPTR " still read by stream %p's work #%llu, "
                              "which this stream (%p, work #%llu) was never made to wait for", it->first, stream,
                              (unsigned long long)seq, running_stream, (unsigned long long)running_seq);
                return buf;
            }
        a.writer = running_stream;
        a.written = running_seq;
        a.reads.clear();
    } else {
        bool found = false;
        for (auto &[stream, seq] : a.reads)
            if (stream == running_stream) {
                seq = running_seq;
                found = true;
            }
        if (!found) a.reads.push_back({running_stream, running_seq});
    }
    return {};
}

// The checks of work as its stream runs it: every buffer still live and in bounds, and each
// access ordered after the accesses it depends on.
CUresult run_checks(Ctx *ctx, const std::string &call, const std::vector<Buffer> &bufs) {
    const std::string when = call + " (when run)";
    if (CUresult r = check_buffers(ctx, when.c_str(), bufs)) return r;
    for (const Buffer &b : bufs)
        if (std::string why = ordered_access(b); !why.empty())
            return fault(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, "%s: %s = 0x%" PRIxPTR ": unordered: %s", call.c_str(), b.name,
                         b.ptr, why.c_str());
    return CUDA_SUCCESS;
}

Stream *null_stream(Ctx *ctx) {
    std::lock_guard<std::mutex> g(handles_mu);
    if (!ctx->null_stream) {
        ctx->null_stream = new Stream(ctx, true);
        all_streams.insert(ctx->null_stream);
    }
    return ctx->null_stream;
}

// The stream behind a CUstream handle (0 and the legacy/per-thread handles: the context's
// default stream), or null for an unknown handle.
Stream *resolve(void *h, Ctx *ctx) {
    if (h == nullptr || h == (void *)0x1 || h == (void *)0x2) return ctx ? null_stream(ctx) : nullptr;
    std::lock_guard<std::mutex> g(handles_mu);
    return all_streams.count((Stream *)h) ? (Stream *)h : nullptr;
}

// Enqueues `op` on `s`, ordered as CUDA orders the legacy default stream: work on it waits for
// the work before it on every blocking stream of its context, and work on a blocking stream
// waits for the default stream's.
uint64_t enqueue(Stream *s, std::function<void()> op) {
    if (!cfg().immediate) {
        std::vector<std::pair<Stream *, uint64_t>> deps;
        {
            std::lock_guard<std::mutex> g(handles_mu);
            Ctx *c = s->ctx;
            if (s == c->null_stream) {
                for (Stream *o : c->streams)
                    if (o->blocking) deps.push_back({o, 0});
            } else if (s->blocking && c->null_stream) {
                deps.push_back({c->null_stream, 0});
            }
        }
        for (auto &d : deps) d.second = d.first->tail();
        if (!deps.empty()) {
            s->push([deps] {
                for (auto &d : deps) d.first->wait_for(d.second);
            });
            std::lock_guard<std::mutex> g(clock_mu);
            for (auto &d : deps) join(stream_clocks[s], stream_clocks[d.first]);
        }
    }
    auto clock = std::make_shared<Clock>();
    {
        std::lock_guard<std::mutex> g(clock_mu);
        Clock &vc = stream_clocks[s];
        join(vc, host_clock); // host order: what the host saw complete comes before
        *clock = vc;
    }
    const uint64_t seq = s->push([op = std::move(op), clock] {
        running_clock = clock.get();
        op();
        running_clock = nullptr;
    });
    std::lock_guard<std::mutex> g(clock_mu);
    uint64_t &own = stream_clocks[s][s];
    own = std::max(own, seq);
    return seq;
}

void sync_stream(Stream *s) {
    s->wait_for(s->tail());
    std::lock_guard<std::mutex> g(clock_mu);
    join(host_clock, stream_clocks[s]);
}

void sync_ctx(Ctx *ctx) {
    std::vector<Stream *> ss;
    {
        std::lock_guard<std::mutex> g(handles_mu);
        ss.assign(ctx->streams.begin(), ctx->streams.end());
        if (ctx->null_stream) ss.push_back(ctx->null_stream);
    }
    for (Stream *s : ss) sync_stream(s);
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------- modules and launches

enum class Entry { F32, F16, BF16, Merge, Tokens };
struct Module {
    Ctx *ctx;
    std::set<std::string> names;
};
struct Function {
    Module *module;
    Entry entry;
    std::string name;
};
std::set<Module *> all_modules;
std::set<Function *> all_functions;

constexpr struct {
    const char *name;
    Entry entry;
} ENTRIES[] = {{"infopo_f32", Entry::F32}, {"infopo_f16", Entry::F16}, {"infopo_bf16", Entry::BF16},
               {"infopo_merge", Entry::Merge}, {"infopo_bf16_packed", Entry::BF16}, {"infopo_bf16_packed_bump", Entry::BF16},
               {"infopo_f32_ring", Entry::F32},       {"infopo_f16_ring", Entry::F16},
               {"infopo_bf16_ring", Entry::BF16},     {"infopo_tokens", Entry::Tokens}};
constexpr uint32_t FATBIN_MAGIC = 0xBA55ED50u;
constexpr unsigned MAX_THREADS = 256; // the kernel's __launch_bounds__

bool image_has(const unsigned char *img, size_t n, const std::string &name) {
    const std::string needle = name + '\0';
    return std::search(img, img + n, needle.begin(), needle.end()) != img + n;
}

// The buffers a launch reads or writes, with their extents, as kernels/args.h states them.
std::vector<Buffer> launch_buffers(const InfopoArgs &a, Entry e) {
    std::vector<Buffer> b;
    auto n = [](int64_t v) { return v > 0 ? (size_t)v : 0; };
    // infopo_tokens reads no rows: only the epilogue's buffers (its args are its launch's).
    const size_t rows = e == Entry::Tokens ? 0 : n(a.n_rows), T = n(a.n_turns), B = n(a.n_traj), G = n(a.n_groups);
    const bool merge = e == Entry::Merge, partial = !merge && a.state_out != nullptr;
    const size_t elem = e == Entry::F32 ? 4 : 2;
    if (rows > 0) {
        b.push_back({"targets", (uintptr_t)a.targets, rows * 8});
        if (merge) {
            b.push_back({"merge_states", (uintptr_t)a.merge_states, n(a.merge_parts) * rows * 8 * 4});
        } else {
            const size_t stride = a.row_stride ? n(a.row_stride) : n(a.vocab);
            const size_t span = ((rows - 1) * stride + n(a.vocab)) * elem;
            b.push_back({"real", (uintptr_t)a.real, span});
            b.push_back({"masked", (uintptr_t)a.masked, span});
            if (a.splits > 1) {
                b.push_back({"partials", (uintptr_t)a.partials, rows * a.splits * INFOPO_STATE_FLOATS * 4, true});
                b.push_back({"row_tickets", (uintptr_t)a.row_tickets, rows * 4, true});
            }
        }
        if (partial) {
            b.push_back({"state_out", (uintptr_t)a.state_out, rows * INFOPO_RANGE_STATE_FLOATS * 4, true});
        } else {
            b.push_back({"row_out", (uintptr_t)a.row_out, rows * INFOPO_ROW_OUTPUTS * 4, true});
            b.push_back({"error_word", (uintptr_t)a.error_word, 8, true});
        }
    }
    if (T > 0 && !partial) {
        if (rows > 0) b.push_back({"grid_ticket", (uintptr_t)a.grid_ticket, 4, true});
        b.push_back({"turn_offsets", (uintptr_t)a.turn_offsets, (T + 1) * 4});
        b.push_back({"turn_sum", (uintptr_t)a.turn_sum, T * 8, true});
        b.push_back({"turn_count", (uintptr_t)a.turn_count, T * 8, true});
        b.push_back({"turn_info", (uintptr_t)a.turn_info, T * 8, true});
        if (a.finalize && B > 0) {
            b.push_back({"turn_trajectory", (uintptr_t)a.turn_trajectory, T * 4});
            b.push_back({"turn_credit", (uintptr_t)a.turn_credit, T * 4});
            b.push_back({"trajectory_outcome", (uintptr_t)a.trajectory_outcome, B * 8});
            b.push_back({"trajectory_tokens", (uintptr_t)a.trajectory_tokens, B * 4});
            b.push_back({"group_trajectory_offsets", (uintptr_t)a.group_trajectory_offsets, (G + 1) * 4});
            b.push_back({"group_trajectories", (uintptr_t)a.group_trajectories, B * 4});
            b.push_back({"group_turn_offsets", (uintptr_t)a.group_turn_offsets, (G + 1) * 4});
            b.push_back({"group_turns", (uintptr_t)a.group_turns, T * 4});
            b.push_back({"turn_intrinsic", (uintptr_t)a.turn_intrinsic, T * 8, true});
            b.push_back({"turn_norm", (uintptr_t)a.turn_norm, T * 8, true});
            b.push_back({"turn_bonus", (uintptr_t)a.turn_bonus, T * 8, true});
            b.push_back({"traj_advantage", (uintptr_t)a.traj_advantage, B * 8, true});
            b.push_back({"traj_gate", (uintptr_t)a.traj_gate, B * 8, true});
            b.push_back({"scalars", (uintptr_t)a.scalars, 3 * 8, true});
            if (a.token_advantage) {
                const double m = a.total_tokens;
                b.push_back({"token_advantage", (uintptr_t)a.token_advantage, m > 0 ? (size_t)m * 8 : 0, true});
                b.push_back({"trajectory_token_offsets", (uintptr_t)a.trajectory_token_offsets, (B + 1) * 8});
                b.push_back({"turn_credit_start", (uintptr_t)a.turn_credit_start, T * 4});
            }
        }
    }
    return b;
}

// fake_cuda_abort_next_launch: the calling thread's next launch runs only this many blocks (0: none
// pending). Per thread: the tests of a binary run in parallel in one process, and another test's
// launch must not take the cut.
thread_local unsigned abort_after = 0;

void emulate(Entry e, const InfopoArgs &a, unsigned grid, unsigned block, unsigned blocks_run) {
    const InfopoEmulation opt{std::min(std::max(cfg().blocks_at_once, 1u), (unsigned)INFOPO_EMU_MAX_BLOCKS_AT_ONCE),
                              blocks_run, cfg().seed};
    switch (e) {
    case Entry::F32: infopo_emulate_f32(&a, grid, block, &opt); break;
    case Entry::F16: infopo_emulate_f16(&a, grid, block, &opt); break;
    case Entry::BF16: infopo_emulate_bf16(&a, grid, block, &opt); break;
    case Entry::Merge: infopo_emulate_merge(&a, grid, block, &opt); break;
    case Entry::Tokens: infopo_emulate_tokens(&a, grid, block, &opt); break;
    }
}

// ---------------------------------------------------------------- cuBLAS and NCCL state

struct Blas {
    Ctx *ctx;
    void *stream = nullptr; // CUstream handle
};
std::set<Blas *> all_blas;

struct Clique {
    int ranks;
    std::mutex mu;
    std::condition_variable cv;
    bool aborted = false;
    struct Call {
        int arrived = 0, left = 0, gone = 0;
        bool complete = false;
        size_t count = 0;
        int dtype = -1;
        bool mismatch = false;
        std::vector<uintptr_t> send;
    };
    std::map<uint64_t, Call> calls; // by collective sequence number
};
struct Comm {
    std::shared_ptr<Clique> clique;
    int rank, dev;
    uint64_t next = 0; // sequence number of this rank's next collective
};
std::set<Comm *> all_comms;

size_t nccl_size(int dtype) {
    switch (dtype) {
    case 0: case 1: return 1;              // int8, uint8
    case 2: case 3: case 7: return 4;      // int32, uint32, float32
    case 4: case 5: case 8: return 8;      // int64, uint64, float64
    case 6: case 9: return 2;              // float16, bfloat16
    default: return 0;
    }
}

} // namespace fake

using namespace fake;

// The context of the calling thread, or the error a call without one gets.
#define NEED_CTX(ctx)                                                                                                  \
    Ctx *ctx = current;                                                                                                \
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;                                                               \
    if (!ctx) return CUDA_ERROR_INVALID_CONTEXT;                                                                       \
    if (int s_ = ctx->sticky.load()) return s_;

#define STREAM_OR_FAIL(s, h, ctx)                                                                                      \
    Stream *s = resolve((void *)(h), ctx);                                                                             \
    if (!s) return CUDA_ERROR_INVALID_HANDLE;                                                                          \
    if (s->ctx != ctx) return fault(ctx, CUDA_ERROR_INVALID_HANDLE, "stream %p belongs to device %d, context is device %d", (void *)(h), s->ctx->dev, ctx->dev);

extern "C" {

// ---------------------------------------------------------------- test hooks

uint64_t fake_cuda_call_count(const char *name) {
    std::lock_guard<std::mutex> g(counts_mu);
    auto it = counts().find(name);
    return it == counts().end() ? 0 : it->second;
}
uint64_t fake_cuda_thread_call_count(const char *name) {
    auto it = thread_counts.find(name);
    return it == thread_counts.end() ? 0 : it->second;
}
int fake_cuda_is_stand_in(void) { return 1; }
// The next kernel launch (on any stream) runs only its first `blocks` blocks and then stops
// without an error, as a launch cut short (a cancelled graph replay, say) leaves its tickets.
void fake_cuda_abort_next_launch(unsigned blocks) { abort_after = blocks == 0 ? 1 : blocks; }

// ---------------------------------------------------------------- driver: init, devices, contexts

CUresult cuInit(unsigned flags) {
    called("cuInit", "%u", flags);
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    contexts();
    initialised = true;
    return CUDA_SUCCESS;
}
CUresult cuDriverGetVersion(int *v) {
    called("cuDriverGetVersion");
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetCount(int *n) {
    called("cuDeviceGetCount");
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    *n = cfg().devices;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    called("cuDeviceGet", "%d", ordinal);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (ordinal < 0 || ordinal >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    called("cuDeviceGetName", "%d", d);
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, (size_t)len, "CPU stand-in of a CUDA device (.ci/fake-cuda)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    called("cuDeviceTotalMem_v2", "%d", d);
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = cfg().mem;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    called("cuDeviceGetAttribute", "%d, %d", attr, d);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
    case 1: *v = 1024; break;                 // MAX_THREADS_PER_BLOCK
    case 2: case 3: *v = 1024; break;         // MAX_BLOCK_DIM_X, Y
    case 4: *v = 64; break;                   // MAX_BLOCK_DIM_Z
    case 5: *v = 2147483647; break;           // MAX_GRID_DIM_X
    case 6: case 7: *v = 65535; break;        // MAX_GRID_DIM_Y, Z
    case 8: *v = 49152; break;                // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;                  // WARP_SIZE
    case 16: *v = cfg().sms; break;           // MULTIPROCESSOR_COUNT
    case 38: *v = 50 << 20; break;            // L2_CACHE_SIZE
    case 39: *v = 2048; break;                // MAX_THREADS_PER_MULTIPROCESSOR
    case 75: *v = 9; break;                   // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;                   // COMPUTE_CAPABILITY_MINOR
    case 97: *v = 232448; break;              // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *v = 1; break;                  // MEMORY_POOLS_SUPPORTED
    default:
        std::fprintf(stderr, "fake-cuda: cuDeviceGetAttribute(%d) is not modelled: answering 0\n", attr);
        *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(Ctx **pctx, CUdevice d) {
    called("cuDevicePrimaryCtxRetain", "%d", d);
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED;
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(handles_mu);
    Ctx *c = contexts()[(size_t)d];
    ++c->retained;
    *pctx = c;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    called("cuDevicePrimaryCtxRelease_v2", "%d", d);
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    std::lock_guard<std::mutex> g(handles_mu);
    Ctx *c = contexts()[(size_t)d];
    if (c->retained <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    --c->retained;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(Ctx *ctx) {
    called("cuCtxSetCurrent", "%p", (void *)ctx);
    if (ctx) {
        std::lock_guard<std::mutex> g(handles_mu);
        if (std::find(contexts().begin(), contexts().end(), ctx) == contexts().end()) return CUDA_ERROR_INVALID_CONTEXT;
    }
    current = ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(Ctx **pctx) {
    called("cuCtxGetCurrent");
    *pctx = current;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice *d) {
    called("cuCtxGetDevice");
    NEED_CTX(ctx);
    *d = ctx->dev;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize(void) {
    called("cuCtxSynchronize");
    NEED_CTX(ctx);
    sync_ctx(ctx);
    return ctx->sticky.load();
}
CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case CUDA_SUCCESS: *s = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *s = "initialization error"; break;
    case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_IMAGE: *s = "device kernel image is invalid"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "invalid device context"; break;
    case CUDA_ERROR_INVALID_HANDLE: *s = "invalid resource handle"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
    case CUDA_ERROR_NOT_READY: *s = "device not ready"; break;
    case CUDA_ERROR_ILLEGAL_ADDRESS: *s = "an illegal memory access was encountered"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "too many resources requested for launch"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "operation not supported (by the CPU stand-in)"; break;
    default: *s = "unknown error"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char **s) {
    *s = e == CUDA_ERROR_ILLEGAL_ADDRESS ? "CUDA_ERROR_ILLEGAL_ADDRESS" : "CUDA_ERROR";
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- streams and events

CUresult cuStreamCreate(Stream **ps, unsigned flags) {
    called("cuStreamCreate", "%u", flags);
    NEED_CTX(ctx);
    Stream *s = new Stream(ctx, (flags & 1u) == 0); // CU_STREAM_NON_BLOCKING = 1
    std::lock_guard<std::mutex> g(handles_mu);
    ctx->streams.insert(s);
    all_streams.insert(s);
    *ps = s;
    return CUDA_SUCCESS;
}
CUresult cuStreamDestroy_v2(Stream *h) {
    called("cuStreamDestroy_v2", "%p", (void *)h);
    NEED_CTX(ctx);
    Stream *s = resolve(h, ctx);
    if (!s || s == ctx->null_stream) return CUDA_ERROR_INVALID_HANDLE;
    // A GPU lets the queued work finish after the call returns; waiting here gives the same
    // results.
    sync_stream(s);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        s->ctx->streams.erase(s);
        all_streams.erase(s);
    }
    // The worker ends, the object stays: an event recorded on this stream may still be waited
    // on, and then finds its work complete.
    {
        std::lock_guard<std::mutex> l(s->mu);
        s->stop = true;
        s->cv.notify_all();
    }
    if (s->worker.joinable()) s->worker.join();
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(Stream *h) {
    called("cuStreamSynchronize", "%p", (void *)h);
    NEED_CTX(ctx);
    Stream *s = resolve(h, ctx);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    sync_stream(s);
    return s->ctx->sticky.load();
}
CUresult cuStreamQuery(Stream *h) {
    called("cuStreamQuery", "%p", (void *)h);
    NEED_CTX(ctx);
    Stream *s = resolve(h, ctx);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    return s->done(s->tail()) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
CUresult cuStreamGetCtx(Stream *h, Ctx **pctx) {
    called("cuStreamGetCtx", "%p", (void *)h);
    NEED_CTX(ctx);
    Stream *s = resolve(h, ctx);
    if (!s) return CUDA_ERROR_INVALID_HANDLE;
    *pctx = s->ctx;
    return CUDA_SUCCESS;
}
CUresult cuEventCreate(Event **pe, unsigned flags) {
    called("cuEventCreate", "%u", flags);
    NEED_CTX(ctx);
    Event *e = new Event();
    std::lock_guard<std::mutex> g(handles_mu);
    all_events.insert(e);
    *pe = e;
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(Event *e) {
    called("cuEventDestroy_v2", "%p", (void *)e);
    std::lock_guard<std::mutex> g(handles_mu);
    if (!all_events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
    // Work already enqueued may still stamp it: keep the memory (events are small).
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(Event *e, Stream *h) {
    called("cuEventRecord", "%p, %p", (void *)e, (void *)h);
    NEED_CTX(ctx);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    }
    STREAM_OR_FAIL(s, h, ctx);
    const uint64_t seq = enqueue(s, [e] { e->ms.store(now_ms()); });
    e->stream = s;
    e->seq = seq;
    std::lock_guard<std::mutex> g(clock_mu);
    e->clock = stream_clocks[s];
    return CUDA_SUCCESS;
}
CUresult cuEventQuery(Event *e) {
    called("cuEventQuery", "%p", (void *)e);
    if (!e->stream) return CUDA_SUCCESS;
    if (!e->stream->done(e->seq)) return CUDA_ERROR_NOT_READY;
    std::lock_guard<std::mutex> g(clock_mu);
    join(host_clock, e->clock);
    return CUDA_SUCCESS;
}
CUresult cuEventSynchronize(Event *e) {
    called("cuEventSynchronize", "%p", (void *)e);
    if (e->stream) e->stream->wait_for(e->seq);
    {
        std::lock_guard<std::mutex> g(clock_mu);
        join(host_clock, e->clock);
    }
    return e->stream ? e->stream->ctx->sticky.load() : CUDA_SUCCESS;
}
CUresult cuEventElapsedTime(float *ms, Event *a, Event *b) {
    called("cuEventElapsedTime", "%p, %p", (void *)a, (void *)b);
    if (!a->stream || !b->stream) return CUDA_ERROR_INVALID_HANDLE;
    if (!a->stream->done(a->seq) || !b->stream->done(b->seq)) return CUDA_ERROR_NOT_READY;
    *ms = (float)(b->ms.load() - a->ms.load());
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float *ms, Event *a, Event *b) { return cuEventElapsedTime(ms, a, b); }
CUresult cuStreamWaitEvent(Stream *h, Event *e, unsigned flags) {
    called("cuStreamWaitEvent", "%p, %p, %u", (void *)h, (void *)e, flags);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    // Waits for the event's most recent record at the time of this call, as CUDA does.
    Stream *src = e->stream;
    const uint64_t seq = e->seq;
    if (src && src != s) {
        enqueue(s, [src, seq] { src->wait_for(seq); });
        std::lock_guard<std::mutex> g(clock_mu);
        join(stream_clocks[s], e->clock);
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- memory

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t bytes) {
    called("cuMemAlloc_v2", "%zu", bytes);
    NEED_CTX(ctx);
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (pools[ctx->dev].live + bytes > cfg().mem) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = allocate(bytes, ctx->dev, false);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    called("cuMemFree_v2", "0x%llx", p);
    NEED_CTX(ctx);
    sync_ctx(ctx); // cuMemFree synchronises the device
    return release(ctx, (uintptr_t)p, "cuMemFree_v2");
}
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t bytes, Stream *h) {
    called("cuMemAllocAsync", "%zu, %p", bytes, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    if (bytes == 0) { // what current drivers answer (cuMemAlloc_v2 refuses 0 bytes instead)
        *p = 0;
        return CUDA_SUCCESS;
    }
    if (pools[ctx->dev].live + bytes > cfg().mem) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = allocate(bytes, ctx->dev, true);
    if (!*p) return CUDA_ERROR_OUT_OF_MEMORY;
    // Stream-ordered: usable after the stream's work so far; another stream must wait for it.
    const uint64_t tail = s->tail();
    std::lock_guard<std::mutex> g(mem_mu);
    allocs[(uintptr_t)*p].writer = s;
    allocs[(uintptr_t)*p].written = tail;
    return CUDA_SUCCESS;
}
CUresult cuMemFreeAsync(CUdeviceptr p, Stream *h) {
    called("cuMemFreeAsync", "0x%llx, %p", p, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    if (p == 0) return CUDA_SUCCESS; // the null pointer of a zero-byte allocation
    if (std::string why = check_range((uintptr_t)p, 1, ctx->dev); !why.empty())
        return fault(ctx, CUDA_ERROR_INVALID_VALUE, "cuMemFreeAsync: 0x%llx: %s", p, why.c_str());
    enqueue(s, [ctx, p] {
        // A free is a write: every earlier use on another stream must be ordered before it.
        if (run_checks(ctx, "cuMemFreeAsync", {{"the freed allocation", (uintptr_t)p, 1, true}})) return;
        release(ctx, (uintptr_t)p, "cuMemFreeAsync");
    });
    return CUDA_SUCCESS;
}
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    called("cuMemGetInfo_v2");
    NEED_CTX(ctx);
    std::lock_guard<std::mutex> g(mem_mu);
    *total = cfg().mem;
    *free_bytes = cfg().mem - std::min<uint64_t>(cfg().mem, pools[ctx->dev].live);
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetMemPool(void **pool, CUdevice d) {
    called("cuDeviceGetMemPool", "%d", d);
    if (d < 0 || d >= cfg().devices) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &pools[d];
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetDefaultMemPool(void **pool, CUdevice d) { return cuDeviceGetMemPool(pool, d); }
CUresult cuMemPoolGetAttribute(void *pool, int attr, void *value) {
    called("cuMemPoolGetAttribute", "%p, %d", pool, attr);
    auto *s = (PoolStats *)pool;
    if (s < pools || s >= pools + cfg().devices) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(mem_mu);
    switch (attr) {
    case 1: case 2: case 3: *(int *)value = 1; break;           // reuse policies
    case 4: *(uint64_t *)value = 0; break;                      // RELEASE_THRESHOLD
    case 5: case 7: *(uint64_t *)value = s->used; break;        // RESERVED/USED_MEM_CURRENT
    case 6: case 8: *(uint64_t *)value = s->used_high; break;   // RESERVED/USED_MEM_HIGH
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
CUresult cuMemPoolSetAttribute(void *pool, int attr, void *value) {
    called("cuMemPoolSetAttribute", "%p, %d", pool, attr);
    auto *s = (PoolStats *)pool;
    if (s < pools || s >= pools + cfg().devices) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> g(mem_mu);
    switch (attr) {
    case 1: case 2: case 3: case 4: break;
    case 6: case 8: // a high-water mark may only be reset (to the current value)
        if (*(uint64_t *)value != 0) return CUDA_ERROR_INVALID_VALUE;
        s->used_high = s->used;
        break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, Stream *h) {
    called("cuMemcpyHtoDAsync_v2", "0x%llx, %p, %zu, %p", dst, src, n, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    if (CUresult r = check_buffers(ctx, "cuMemcpyHtoDAsync_v2", {{"dst", (uintptr_t)dst, n}})) return r;
    if (n > 0 && check_range((uintptr_t)src, 1, ctx->dev).empty())
        return fault(ctx, CUDA_ERROR_INVALID_VALUE, "cuMemcpyHtoDAsync_v2: the source 0x%" PRIxPTR " is device memory", (uintptr_t)src);
    // Pageable memory: the call returns once the source is staged; the copy runs in order.
    auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char *)src, (const unsigned char *)src + n);
    enqueue(s, [ctx, dst, n, staged] {
        if (run_checks(ctx, "cuMemcpyHtoDAsync_v2", {{"dst", (uintptr_t)dst, n, true}}) == CUDA_SUCCESS && n)
            std::memcpy((void *)dst, staged->data(), n);
    });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, Stream *h) {
    called("cuMemcpyDtoHAsync_v2", "%p, 0x%llx, %zu, %p", dst, src, n, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    if (CUresult r = check_buffers(ctx, "cuMemcpyDtoHAsync_v2", {{"src", (uintptr_t)src, n}})) return r;
    // Pageable memory: the call returns when the copy is done.
    const uint64_t seq = enqueue(s, [ctx, dst, src, n] {
        if (run_checks(ctx, "cuMemcpyDtoHAsync_v2", {{"src", (uintptr_t)src, n}}) == CUDA_SUCCESS && n)
            std::memcpy(dst, (const void *)src, n);
    });
    s->wait_for(seq);
    {
        std::lock_guard<std::mutex> g(clock_mu);
        join(host_clock, stream_clocks[s]);
    }
    return ctx->sticky.load();
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, Stream *h) {
    called("cuMemcpyDtoDAsync_v2", "0x%llx, 0x%llx, %zu, %p", dst, src, n, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    const std::vector<Buffer> bufs{{"src", (uintptr_t)src, n}, {"dst", (uintptr_t)dst, n, true}};
    if (CUresult r = check_buffers(ctx, "cuMemcpyDtoDAsync_v2", bufs)) return r;
    enqueue(s, [ctx, dst, src, n, bufs] {
        if (run_checks(ctx, "cuMemcpyDtoDAsync_v2", bufs) == CUDA_SUCCESS && n)
            std::memmove((void *)dst, (const void *)src, n);
    });
    return CUDA_SUCCESS;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    if (CUresult r = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}
CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) { return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    if (CUresult r = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, Stream *h) {
    called("cuMemsetD8Async", "0x%llx, %u, %zu, %p", dst, (unsigned)v, n, (void *)h);
    NEED_CTX(ctx);
    STREAM_OR_FAIL(s, h, ctx);
    if (CUresult r = check_buffers(ctx, "cuMemsetD8Async", {{"dst", (uintptr_t)dst, n}})) return r;
    enqueue(s, [ctx, dst, v, n] {
        if (run_checks(ctx, "cuMemsetD8Async", {{"dst", (uintptr_t)dst, n, true}}) == CUDA_SUCCESS && n)
            std::memset((void *)dst, v, n);
    });
    return CUDA_SUCCESS;
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    if (CUresult r = cuMemsetD8Async(dst, v, n, nullptr)) return r;
    return cuStreamSynchronize(nullptr);
}
CUresult cuPointerGetAttribute(void *data, int attr, CUdeviceptr p) {
    called("cuPointerGetAttribute", "%d, 0x%llx", attr, p);
    std::lock_guard<std::mutex> g(mem_mu);
    auto it = allocs.upper_bound((uintptr_t)p);
    if (it == allocs.begin()) return CUDA_ERROR_INVALID_VALUE;
    --it;
    if (!it->second.live || (uintptr_t)p >= it->first + it->second.size) return CUDA_ERROR_INVALID_VALUE;
    switch (attr) {
    case 1: *(Ctx **)data = contexts()[(size_t)it->second.dev]; break;  // CONTEXT
    case 2: *(unsigned *)data = 2; break;                               // MEMORY_TYPE: device
    case 9: *(int *)data = it->second.dev; break;                       // DEVICE_ORDINAL
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- modules and launches

CUresult cuModuleLoadData(Module **pm, const void *image) {
    called("cuModuleLoadData", "%p", image);
    NEED_CTX(ctx);
    const auto *img = (const unsigned char *)image;
    uint32_t magic;
    std::memcpy(&magic, img, 4);
    if (magic != FATBIN_MAGIC) {
        std::fprintf(stderr, "fake-cuda: cuModuleLoadData: not a fatbin (magic 0x%08x): the stand-in runs only this "
                             "crate's kernels\n", magic);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    uint16_t header;
    uint64_t body;
    std::memcpy(&header, img + 6, 2);
    std::memcpy(&body, img + 8, 8);
    auto *m = new Module{ctx, {}};
    for (const auto &e : ENTRIES)
        if (image_has(img, header + body, e.name)) m->names.insert(e.name);
    std::lock_guard<std::mutex> g(handles_mu);
    all_modules.insert(m);
    *pm = m;
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(Module *m) {
    called("cuModuleUnload", "%p", (void *)m);
    std::lock_guard<std::mutex> g(handles_mu);
    if (!all_modules.erase(m)) return CUDA_ERROR_INVALID_HANDLE;
    return CUDA_SUCCESS; // functions stay valid for work already enqueued
}
CUresult cuModuleGetFunction(Function **pf, Module *m, const char *name) {
    called("cuModuleGetFunction", "%p, %s", (void *)m, name);
    NEED_CTX(ctx);
    std::lock_guard<std::mutex> g(handles_mu);
    if (!all_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    if (!m->names.count(name)) return CUDA_ERROR_NOT_FOUND;
    for (const auto &e : ENTRIES)
        if (name == std::string(e.name)) {
            auto *f = new Function{m, e.entry, name};
            all_functions.insert(f);
            *pf = f;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_NOT_FOUND;
}
CUresult cuFuncGetAttribute(int *v, int attr, Function *f) {
    called("cuFuncGetAttribute", "%d, %p", attr, (void *)f);
    switch (attr) {
    case 0: *v = (int)MAX_THREADS; break; // MAX_THREADS_PER_BLOCK
    default: *v = 0;
    }
    return CUDA_SUCCESS;
}
CUresult cuLaunchKernel(Function *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shmem, Stream *h, void **params, void **extra) {
    called("cuLaunchKernel", "%s, grid %u x %u x %u, block %u x %u x %u, shmem %u, %p", f ? f->name.c_str() : "?", gx, gy,
           gz, bx, by, bz, shmem, (void *)h);
    NEED_CTX(ctx);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (f->module->ctx != ctx)
        return fault(ctx, CUDA_ERROR_INVALID_HANDLE, "cuLaunchKernel: %s was loaded on device %d, launched on device %d",
                     f->name.c_str(), f->module->ctx->dev, ctx->dev);
    STREAM_OR_FAIL(s, h, ctx);
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535 ||
        bx > 1024 || by > 1024 || bz > 64 || (uint64_t)bx * by * bz > 1024)
        return fault(ctx, CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel: %s: grid %u x %u x %u, block %u x %u x %u out of range",
                     f->name.c_str(), gx, gy, gz, bx, by, bz);
    if ((uint64_t)bx * by * bz > MAX_THREADS)
        return fault(ctx, CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "cuLaunchKernel: %s: %u threads per block, above its "
                     "__launch_bounds__ of %u", f->name.c_str(), bx * by * bz, MAX_THREADS);
    if (shmem > 49152) return fault(ctx, CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel: %u bytes of dynamic shared memory", shmem);
    if (by != 1 || bz != 1 || gy != 1 || gz != 1 || bx % 32 != 0 || shmem != 0)
        return fault(ctx, CUDA_ERROR_NOT_SUPPORTED, "cuLaunchKernel: %s: the emulator runs 1-D grids of whole warps with no "
                     "dynamic shared memory (grid %u x %u x %u, block %u x %u x %u, shmem %u)", f->name.c_str(), gx, gy, gz,
                     bx, by, bz, shmem);
    if (!params || extra) return fault(ctx, CUDA_ERROR_INVALID_VALUE, "cuLaunchKernel: arguments must come as kernelParams");
    InfopoArgs args;
    std::memcpy(&args, params[0], sizeof args); // a launch copies its arguments
    const Entry e = f->entry;
    if (CUresult r = check_buffers(ctx, f->name.c_str(), launch_buffers(args, e))) return r;
    const std::string name = f->name;
    const unsigned blocks_run = std::exchange(abort_after, 0u);
    enqueue(s, [ctx, e, args, gx, bx, name, blocks_run] {
        if (ctx->sticky.load()) return; // a faulted context runs nothing more
        if (run_checks(ctx, name, launch_buffers(args, e)) != CUDA_SUCCESS) return;
        // A kernel takes a while: work on another stream that does not wait for it runs first.
        if (cfg().launch_delay_us > 0) std::this_thread::sleep_for(std::chrono::microseconds(cfg().launch_delay_us));
        emulate(e, args, gx, bx, blocks_run);
    });
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------- cuBLAS

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};

int cublasCreate_v2(Blas **ph) {
    called("cublasCreate_v2");
    if (!current || !initialised) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto *b = new Blas{current};
    std::lock_guard<std::mutex> g(handles_mu);
    all_blas.insert(b);
    *ph = b;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasDestroy_v2(Blas *b) {
    called("cublasDestroy_v2", "%p", (void *)b);
    std::lock_guard<std::mutex> g(handles_mu);
    if (!all_blas.erase(b)) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete b;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasSetStream_v2(Blas *b, Stream *h) {
    called("cublasSetStream_v2", "%p, %p", (void *)b, (void *)h);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_blas.count(b)) return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    Stream *s = resolve(h, b->ctx);
    if (!s || s->ctx != b->ctx) return CUBLAS_STATUS_INVALID_VALUE;
    b->stream = h;
    return CUBLAS_STATUS_SUCCESS;
}
int cublasGetStream_v2(Blas *b, void **h) {
    called("cublasGetStream_v2", "%p", (void *)b);
    *h = b->stream;
    return CUBLAS_STATUS_SUCCESS;
}

static float load_elem(const void *p, int type, size_t i) {
    switch (type) {
    case 0: return ((const float *)p)[i];                             // CUDA_R_32F
    case 2: return __half2float(((const __half *)p)[i]);              // CUDA_R_16F
    default: return __bfloat162float(((const __nv_bfloat16 *)p)[i]); // CUDA_R_16BF
    }
}

// op(X) of a column-major X (leading dimension ld) as `rows` vectors of `k` floats:
// out[r k + p] = op(X)[r, p] when `rows_first`, else op(X)[p, r].
static std::vector<float> unpack(const void *x, int type, int ld, bool trans, int rows, int k, bool rows_first) {
    std::vector<float> out((size_t)rows * (size_t)k);
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < k; ++p) {
            // element (i, j) of op(X) is X[i + j ld] untransposed, X[j + i ld] transposed
            const size_t i = rows_first ? r : p, j = rows_first ? p : r;
            out[(size_t)r * k + p] = load_elem(x, type, trans ? j + i * (size_t)ld : i + j * (size_t)ld);
        }
    return out;
}

// C = alpha op(A) op(B) + beta C, column-major, fp32 accumulation (CUBLAS_COMPUTE_32F); C is
// not read when beta is 0, as cuBLAS does.
int cublasGemmEx(Blas *b, int transa, int transb, int m, int n, int k, const void *alpha, const void *A, int atype,
                 int lda, const void *B, int btype, int ldb, const void *beta, void *C, int ctype, int ldc, int compute,
                 int algo) {
    called("cublasGemmEx", "op %d %d, m %d n %d k %d, A %p type %d ld %d, B %p type %d ld %d, C %p type %d ld %d, "
           "compute %d, algo %d", transa, transb, m, n, k, A, atype, lda, B, btype, ldb, C, ctype, ldc, compute, algo);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_blas.count(b)) return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    Ctx *ctx = b->ctx;
    if (ctx->sticky.load()) return CUBLAS_STATUS_EXECUTION_FAILED;
    if (current != ctx) {
        std::fprintf(stderr, "fake-cuda: cublasGemmEx: the handle's context is not current on this thread\n");
        return CUBLAS_STATUS_EXECUTION_FAILED;
    }
    auto known = [](int t) { return t == 0 || t == 2 || t == 14; };
    auto bad = [&](const char *why) {
        std::fprintf(stderr, "fake-cuda: cublasGemmEx: %s (op %d %d, m %d n %d k %d, ld %d %d %d)\n", why, transa, transb,
                     m, n, k, lda, ldb, ldc);
        return CUBLAS_STATUS_INVALID_VALUE;
    };
    if (transa < 0 || transa > 2 || transb < 0 || transb > 2) return bad("an unknown operation");
    if (m < 0 || n < 0 || k < 0) return bad("a negative dimension");
    if (!known(atype) || atype != btype || ctype != 0 || (compute != 68 && compute != 69))
        return CUBLAS_STATUS_NOT_SUPPORTED; // the stand-in: 16F/16BF/32F inputs, f32 output, COMPUTE_32F
    const int a_rows = transa ? k : m, a_cols = transa ? m : k;
    const int b_rows = transb ? n : k, b_cols = transb ? k : n;
    if (lda < std::max(1, a_rows)) return bad("lda below the rows of A");
    if (ldb < std::max(1, b_rows)) return bad("ldb below the rows of B");
    if (ldc < std::max(1, m)) return bad("ldc below m");
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const size_t ea = atype == 0 ? 4 : 2;
    auto extent = [](int ld, int rows, int cols, size_t e) {
        return rows == 0 || cols == 0 ? 0 : ((size_t)ld * (size_t)(cols - 1) + (size_t)rows) * e;
    };
    const std::vector<Buffer> bufs{{"A", (uintptr_t)A, k ? extent(lda, a_rows, a_cols, ea) : 0},
                                   {"B", (uintptr_t)B, k ? extent(ldb, b_rows, b_cols, ea) : 0},
                                   {"C", (uintptr_t)C, extent(ldc, m, n, 4), true}};
    if (check_buffers(ctx, "cublasGemmEx", bufs)) return CUBLAS_STATUS_EXECUTION_FAILED;
    Stream *s = resolve(b->stream, ctx);
    if (!s) return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *(const float *)alpha, be = *(const float *)beta; // host pointer mode
    enqueue(s, [=] {
        if (ctx->sticky.load() || run_checks(ctx, "cublasGemmEx", bufs)) return;
        // op(A) as m rows of k, op(B) as n columns of k: each entry of C is one contiguous dot.
        const std::vector<float> a = unpack(A, atype, lda, transa != 0, m, k, true);
        const std::vector<float> bt = unpack(B, btype, ldb, transb != 0, n, k, false);
        float *c = (float *)C;
        // fp32 accumulation in 8 lanes (cuBLAS's order differs too; our tolerances allow it),
        // the columns spread over the cores.
        auto columns = [&](int j0, int j1) {
            for (int j = j0; j < j1; ++j)
                for (int i = 0; i < m; ++i) {
                    const float *x = a.data() + (size_t)i * k, *y = bt.data() + (size_t)j * k;
                    float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                    int p = 0;
                    for (; p + 8 <= k; p += 8)
                        for (int q = 0; q < 8; ++q) lane[q] += x[p + q] * y[p + q];
                    float acc = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
                    for (; p < k; ++p) acc += x[p] * y[p];
                    float &out = c[(size_t)i + (size_t)j * ldc];
                    out = be == 0.0f ? al * acc : al * acc + be * out;
                }
        };
        const int workers = (int)std::max(1u, std::min(std::thread::hardware_concurrency(), 16u));
        std::vector<std::thread> pool;
        for (int w = 1; w < workers; ++w) pool.emplace_back(columns, (int)((int64_t)n * w / workers), (int)((int64_t)n * (w + 1) / workers));
        columns(0, (int)((int64_t)n / workers));
        for (auto &t : pool) t.join();
    });
    return CUBLAS_STATUS_SUCCESS;
}

// ---------------------------------------------------------------- NCCL

enum : int { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };

int ncclGetVersion(int *v) {
    called("ncclGetVersion");
    *v = 22800;
    return ncclSuccess;
}
const char *ncclGetErrorString(int r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument";
    case ncclInvalidUsage: return "invalid usage";
    default: return "unhandled error";
    }
}
int ncclCommInitAll(Comm **comms, int ndev, const int *devlist) {
    called("ncclCommInitAll", "%d", ndev);
    if (!initialised) cuInit(0);
    if (ndev < 1 || !comms) return ncclInvalidArgument;
    auto clique = std::make_shared<Clique>();
    clique->ranks = ndev;
    std::set<int> seen;
    for (int r = 0; r < ndev; ++r) {
        const int dev = devlist ? devlist[r] : r;
        if (dev < 0 || dev >= cfg().devices || !seen.insert(dev).second) return ncclInvalidArgument;
    }
    std::lock_guard<std::mutex> g(handles_mu);
    for (int r = 0; r < ndev; ++r) {
        comms[r] = new Comm{clique, r, devlist ? devlist[r] : r, 0};
        all_comms.insert(comms[r]);
    }
    return ncclSuccess;
}
struct ncclUniqueId {
    char internal[128];
};
int ncclGetUniqueId(ncclUniqueId *id) {
    called("ncclGetUniqueId");
    static std::atomic<uint64_t> next{0};
    std::memset(id->internal, 0, sizeof id->internal);
    std::snprintf(id->internal, sizeof id->internal, "fake-nccl-%ld-%llu", (long)getpid(),
                  (unsigned long long)next.fetch_add(1));
    return ncclSuccess;
}

// Collective over the ranks of one id, each on the device current on its calling thread (as
// NCCL takes it): returns when all `nranks` have joined, as NCCL's does.
int ncclCommInitRank(Comm **comm, int nranks, ncclUniqueId id, int rank) {
    called("ncclCommInitRank", "%d, %s, %d", nranks, id.internal, rank);
    if (!current) return ncclInvalidUsage;
    if (nranks < 1 || rank < 0 || rank >= nranks) return ncclInvalidArgument;
    struct Pending {
        std::shared_ptr<Clique> clique;
        std::set<int> ranks;
    };
    static std::mutex mu;
    static std::condition_variable cv;
    static std::map<std::string, Pending> pending;
    const std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
    std::unique_lock<std::mutex> l(mu);
    Pending &p = pending[key];
    if (!p.clique) {
        p.clique = std::make_shared<Clique>();
        p.clique->ranks = nranks;
    }
    if (p.clique->ranks != nranks || !p.ranks.insert(rank).second) return ncclInvalidArgument;
    auto clique = p.clique;
    *comm = new Comm{clique, rank, current->dev, 0};
    {
        std::lock_guard<std::mutex> g(handles_mu);
        all_comms.insert(*comm);
    }
    cv.notify_all();
    cv.wait(l, [&] { return pending.count(key) == 0 || pending[key].ranks.size() == (size_t)nranks; });
    pending.erase(key);
    return ncclSuccess;
}
int ncclCommCount(Comm *c, int *n) {
    called("ncclCommCount");
    *n = c->clique->ranks;
    return ncclSuccess;
}
int ncclCommCuDevice(Comm *c, int *d) {
    called("ncclCommCuDevice");
    *d = c->dev;
    return ncclSuccess;
}
int ncclCommUserRank(Comm *c, int *r) {
    called("ncclCommUserRank");
    *r = c->rank;
    return ncclSuccess;
}
int ncclGroupStart(void) {
    called("ncclGroupStart");
    return ncclSuccess;
}
int ncclGroupEnd(void) {
    called("ncclGroupEnd");
    return ncclSuccess;
}
static int comm_end(Comm *c, const char *name) {
    called(name, "%p", (void *)c);
    std::shared_ptr<Clique> q;
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_comms.erase(c)) return ncclInvalidArgument;
        q = c->clique;
    }
    {
        std::lock_guard<std::mutex> l(q->mu);
        q->aborted = true; // ranks waiting in a collective give up
        q->cv.notify_all();
    }
    delete c;
    return ncclSuccess;
}
int ncclCommAbort(Comm *c) { return comm_end(c, "ncclCommAbort"); }
int ncclCommDestroy(Comm *c) { return comm_end(c, "ncclCommDestroy"); }
int ncclCommFinalize(Comm *c) {
    called("ncclCommFinalize", "%p", (void *)c);
    return ncclSuccess;
}

// Each rank's call is enqueued on its stream; the work completes when every rank's has
// arrived (in its own stream's order) and copied every rank's send buffer, as NCCL orders it.
int ncclAllGather(const void *send, void *recv, size_t count, int dtype, Comm *c, Stream *h) {
    called("ncclAllGather", "%p, %p, %zu, %d, %p, %p", send, recv, count, dtype, (void *)c, (void *)h);
    {
        std::lock_guard<std::mutex> g(handles_mu);
        if (!all_comms.count(c)) return ncclInvalidArgument;
    }
    const size_t es = nccl_size(dtype);
    if (es == 0) return ncclInvalidArgument;
    Ctx *ctx = contexts()[(size_t)c->dev];
    Stream *s = resolve(h, ctx);
    if (!s) return ncclInvalidArgument;
    if (s->ctx != ctx) {
        std::fprintf(stderr, "fake-cuda: ncclAllGather: rank %d's stream is on device %d, its communicator on device %d\n",
                     c->rank, s->ctx->dev, c->dev);
        return ncclInvalidUsage;
    }
    const int ranks = c->clique->ranks, rank = c->rank;
    const size_t bytes = count * es;
    const std::vector<Buffer> bufs{{"sendbuff", (uintptr_t)send, bytes}, {"recvbuff", (uintptr_t)recv, bytes * ranks, true}};
    if (check_buffers(ctx, "ncclAllGather", bufs)) return ncclUnhandledCudaError;
    const uint64_t seq = c->next++;
    std::shared_ptr<Clique> q = c->clique;
    enqueue(s, [=] {
        if (run_checks(ctx, "ncclAllGather", bufs)) return;
        std::unique_lock<std::mutex> l(q->mu);
        Clique::Call &call = q->calls[seq];
        if (call.arrived == 0) {
            call.count = count;
            call.dtype = dtype;
            call.send.assign((size_t)ranks, 0);
        } else if (call.count != count || call.dtype != dtype) {
            call.mismatch = true;
        }
        call.send[(size_t)rank] = (uintptr_t)send;
        if (++call.arrived == ranks) call.complete = true;
        q->cv.notify_all();
        q->cv.wait(l, [&] { return call.complete || q->aborted; });
        if (q->aborted) return;
        if (call.mismatch) {
            l.unlock();
            fault(ctx, CUDA_ERROR_ILLEGAL_ADDRESS, "ncclAllGather #%llu: the ranks passed different counts or types",
                  (unsigned long long)seq);
            l.lock();
        } else {
            for (int r = 0; r < ranks; ++r)
                std::memcpy((unsigned char *)recv + (size_t)r * bytes, (const void *)call.send[(size_t)r], bytes);
        }
        // Every rank has read every send buffer before any rank's stream moves on.
        ++call.left;
        q->cv.notify_all();
        q->cv.wait(l, [&] { return call.left == ranks || q->aborted; });
        if (call.left == ranks && ++call.gone == ranks) q->calls.erase(seq);
    });
    return ncclSuccess;
}

} // extern "C"
