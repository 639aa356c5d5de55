//! Builds the kernels in kernels/ for the enabled features:
//! - `emulator`: kernels/emulator.cpp (which includes kernels/infopo.cu against
//!   kernels/emulator.h) as host C++20 with `cc`, linked into the crate. With
//!   `INFOPO_EMULATOR_TSAN=1` (scripts/tsan) it is built with `-fsanitize=thread` and the
//!   fault switches of its positive controls (`INFOPO_EMULATOR_FAULTS`), and linked with the
//!   ThreadSanitizer runtime (libtsan; the Rust code itself is not instrumented). Never set
//!   for a normal build;
//! - `cuda`: kernels/infopo.cu with nvcc into one fatbin (SASS for each arch of
//!   `INFOPO_CUDA_ARCHS`, default 80,86,89,90, plus PTX for the last), embedded by
//!   `src/launch.rs` through `include_bytes!(concat!(env!("OUT_DIR"), "/infopo.fatbin"))`.
//!   The ptxas report goes to OUT_DIR/ptxas.txt (and to stderr, shown by `cargo build -vv`);
//!   any register spill or stack frame (local memory) fails the build.
//!
//! Without either feature nothing is built.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "INFOPO_CUDA_ARCHS", "INFOPO_CUDA_LINEINFO", "INFOPO_EMULATOR_TSAN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if env::var_os("CARGO_FEATURE_EMULATOR").is_some() {
        build_emulator();
    }
    if env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda();
    }
}

fn build_emulator() {
    let tsan = env::var("INFOPO_EMULATOR_TSAN").is_ok_and(|v| v == "1");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("kernels/emulator.cpp")
        .include("kernels")
        .std("c++20")
        // Always optimised: the emulated kernel runs in tests.
        .opt_level(2)
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings(true);
    if tsan {
        build.flag("-fsanitize=thread").flag("-g").define("INFOPO_EMULATOR_FAULTS", "1");
        // The runtime (rustc links with -nodefaultlibs, so `-fsanitize=thread` at link time
        // would not add it). Only ever with INFOPO_EMULATOR_TSAN=1.
        println!("cargo:rustc-link-lib=dylib=tsan");
    }
    build.compile("infopo_emulator");
    println!("cargo:rustc-link-lib=pthread");
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = PathBuf::from(home).join("bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let local = root.join(".tools/cuda/nvidia/cu13/bin/nvcc");
    if local.is_file() {
        return Some(local);
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

fn build_cuda() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let nvcc = find_nvcc(&root).unwrap_or_else(|| {
        panic!(
            "feature `cuda` needs nvcc, and none was found (NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, \
             .tools/cuda, PATH). Run `scripts/install-nvcc` and set NVCC=<the path it prints>."
        )
    });
    let archs = env::var("INFOPO_CUDA_ARCHS").unwrap_or_else(|_| "80,86,89,90".to_string());
    let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    assert!(!archs.is_empty(), "INFOPO_CUDA_ARCHS is empty");

    let fatbin = out.join("infopo.fatbin");
    let mut cmd = Command::new(&nvcc);
    cmd.arg("-fatbin").args(["-O3", "-ftz=true", "-std=c++17", "-Xptxas", "-v"]).arg("-I").arg(root.join("kernels"));
    // Source line tables for profilers (ncu): INFOPO_CUDA_LINEINFO=1 (doubles the fatbin).
    if env::var("INFOPO_CUDA_LINEINFO").is_ok_and(|v| v == "1") {
        cmd.arg("-lineinfo");
    }
    // The PyPI wheels put the CUDA headers (runtime, crt, cccl) next to bin/; nvcc.profile
    // already adds them, the explicit -I keeps a relocated nvcc working too.
    if let Some(include) = nvcc.parent().and_then(Path::parent).map(|p| p.join("include")) {
        if include.is_dir() {
            cmd.arg("-I").arg(include);
        }
    }
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    let last = archs.last().unwrap();
    cmd.arg(format!("-gencode=arch=compute_{last},code=compute_{last}"));
    cmd.arg("-o").arg(&fatbin).arg(root.join("kernels/infopo.cu"));

    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run nvcc at {}: {e}. Run `scripts/install-nvcc` and set NVCC=<the path it prints>.",
            nvcc.display()
        )
    });
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    std::fs::write(out.join("ptxas.txt"), &report).expect("write ptxas.txt");
    eprintln!("nvcc: {}\n{report}", nvcc.display());
    if !output.status.success() {
        panic!("nvcc failed ({}):\n{report}", output.status);
    }
    let spills = spill_lines(&report);
    if !spills.is_empty() {
        panic!(
            "ptxas reports register spills or a stack frame (local memory; the kernels must use \
             neither):\n{}",
            spills.join("\n")
        );
    }
}

/// Lines of a ptxas -v report whose stack frame, spill stores or spill loads are not 0, with
/// the function they belong to.
fn spill_lines(report: &str) -> Vec<String> {
    let mut function = String::new();
    let mut bad = Vec::new();
    for line in report.lines() {
        if let Some(i) = line.find("Function properties for ") {
            function = line[i + "Function properties for ".len()..].trim().to_string();
        }
        if line.contains("bytes spill stores") {
            let numbers: Vec<u64> = line
                .split(',')
                .filter(|part| part.contains("spill") || part.contains("stack frame"))
                .filter_map(|part| part.split_whitespace().next()?.parse().ok())
                .collect();
            if numbers.iter().any(|&n| n != 0) {
                bad.push(format!("{function}: {}", line.trim()));
            }
        }
    }
    bad
}
