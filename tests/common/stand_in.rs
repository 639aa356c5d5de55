//! Hooks of the CPU stand-in of the CUDA driver (`.ci/fake-cuda`), for the GPU tests that need
//! to count driver calls or cut a launch short. `None` on a real driver: those tests then say
//! so and check what a real GPU allows.

use libloading::{Library, Symbol};

/// The loaded stand-in (the same object cudarc loaded: one file under every library name), or
/// `None` when the driver library is a real one.
pub fn stand_in() -> Option<Library> {
    // SAFETY: the driver library cudarc has already loaded; only our own exported symbol is
    // looked up.
    let lib = unsafe { Library::new("libcuda.so.1") }.ok()?;
    let is = unsafe { lib.get::<unsafe extern "C" fn() -> i32>(b"fake_cuda_is_stand_in") }.ok()?;
    (unsafe { is() } == 1).then_some(lib)
}

/// How many times this thread has called the driver, cuBLAS or NCCL entry `name` (the tests of
/// a binary run in parallel in one process, each on its own thread).
pub fn calls(lib: &Library, name: &str) -> u64 {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: `fake_cuda_thread_call_count(const char *)` of .ci/fake-cuda/fake_cuda.cpp.
    unsafe {
        let f: Symbol<unsafe extern "C" fn(*const std::ffi::c_char) -> u64> =
            lib.get(b"fake_cuda_thread_call_count").unwrap();
        f(name.as_ptr())
    }
}

/// This thread's next kernel launch runs only its first `blocks` blocks and stops without an error.
pub fn abort_next_launch(lib: &Library, blocks: u32) {
    // SAFETY: `fake_cuda_abort_next_launch(unsigned)` of .ci/fake-cuda/fake_cuda.cpp.
    unsafe {
        let f: Symbol<unsafe extern "C" fn(u32)> = lib.get(b"fake_cuda_abort_next_launch").unwrap();
        f(blocks)
    }
}
