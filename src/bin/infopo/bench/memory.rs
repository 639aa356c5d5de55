//! Peak memory of one section of this process beyond what it held when the section began,
//! measured two ways (`infopo bench --fused-linear`):
//!
//! - **resident set** (Linux): writing `5` to `/proc/self/clear_refs` resets the peak resident
//!   set size (`VmHWM`) to the current one (`VmRSS`); after the section, `VmHWM` − `VmRSS` at
//!   the reset is the most resident memory the section added — every allocator, thread stack
//!   and library buffer included, the same number `compare/compare_fused.py` reads for PyTorch.
//!   Unavailable (None) where `/proc/self/clear_refs` cannot be written.
//! - **heap**: the binary's global allocator counts the bytes live between [`Probe::start`] and
//!   [`Probe::finish`] and keeps their maximum: the crate's own allocations, exactly.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// The system allocator, counting while a [`Probe`] is open (one relaxed load per call otherwise).
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed since the probe started (negative when it frees older memory).
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn count(delta: isize) {
    if COUNTING.load(Relaxed) {
        let now = LIVE.fetch_add(delta, Relaxed) + delta;
        if delta > 0 {
            PEAK.fetch_max(now, Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// An open measurement (one at a time).
pub struct Probe {
    rss_at_start_kib: Option<u64>,
}

/// What a section added at its peak, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Peak {
    pub rss: Option<u64>,
    pub heap: u64,
}

impl Probe {
    pub fn start() -> Probe {
        let rss_at_start_kib = reset_peak_rss().then(|| status_kib("VmRSS")).flatten();
        LIVE.store(0, Relaxed);
        PEAK.store(0, Relaxed);
        COUNTING.store(true, Relaxed);
        Probe { rss_at_start_kib }
    }

    pub fn finish(self) -> Peak {
        COUNTING.store(false, Relaxed);
        let heap = PEAK.load(Relaxed).max(0) as u64;
        let rss = match (self.rss_at_start_kib, status_kib("VmHWM")) {
            (Some(start), Some(peak)) => Some(peak.saturating_sub(start) * 1024),
            _ => None,
        };
        Peak { rss, heap }
    }
}

/// Resets `VmHWM` to `VmRSS`; false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` field of /proc/self/status.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_peak_counts_a_buffer_alive_inside_the_section() {
        let probe = Probe::start();
        let buffer = vec![1u8; 64 << 20];
        std::hint::black_box(&buffer);
        drop(buffer);
        let peak = probe.finish();
        // The other unit tests of this binary run in parallel and the count is process-wide: they
        // may allocate inside the section (raising the peak) or free memory they allocated
        // before it (lowering it; CI once saw 24 bytes under 64 MiB). A MiB either way is far
        // more than they touch and far less than the buffer, so a broken count still fails.
        let (buffer_bytes, slack) = (64u64 << 20, 1u64 << 20);
        assert!(peak.heap + slack >= buffer_bytes && peak.heap < buffer_bytes + 8 * slack, "heap peak {}", peak.heap);
        if cfg!(target_os = "linux") {
            let rss = peak.rss.expect("Linux can reset VmHWM");
            assert!(rss >= 60 << 20, "a touched 64 MiB buffer is resident: rss peak {rss}");
        }
    }
}
