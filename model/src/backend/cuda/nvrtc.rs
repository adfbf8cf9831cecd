//! Kernel sources and their compilation with NVRTC, cached on disk.
//!
//! Each module is `kernels/prelude.cuh` followed by one `kernels/<family>.cu`, compiled on its
//! own. The sources use no CUDA header (a machine with only the driver has none): bf16 and f16
//! go through bit casts and inline PTX defined in the prelude. The entry points of a module are
//! read back from its PTX ([`Module::entries`]), so a kernel instantiated by a macro needs no list.
//!
//! The cache (`$LONGTAKE_KERNEL_CACHE`, else `$XDG_CACHE_HOME/longtake/kernels`, else
//! `~/.cache/longtake/kernels`) keeps one PTX file per module, architecture and hash of source,
//! architecture, options and NVRTC version; a cache that cannot be written only costs the
//! compile time on the next start.

use std::path::PathBuf;

const PRELUDE: &str = include_str!("kernels/prelude.cuh");

/// The kernel families, by module name.
const SOURCES: &[(&str, &str)] = &[
    ("cast", include_str!("kernels/cast.cu")),
    ("elementwise", include_str!("kernels/elementwise.cu")),
    ("norm", include_str!("kernels/norm.cu")),
    ("layout", include_str!("kernels/layout.cu")),
    ("attention", include_str!("kernels/attention.cu")),
    ("text", include_str!("kernels/text.cu")),
    ("vae", include_str!("kernels/vae.cu")),
    ("vae_attention", include_str!("kernels/vae_attention.cu")),
];

/// Options for every module: C++17, IEEE division and square root (the CPU reference's), no
/// flush to zero.
const OPTIONS: &[&str] = &[
    "--std=c++17",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

/// The architectures the kernels are compiled for, oldest first. A GPU newer than the last one
/// runs the last one's PTX through the driver's JIT.
pub const ARCHES: &[(&str, (i32, i32))] = &[
    ("compute_80", (8, 0)),
    ("compute_86", (8, 6)),
    ("compute_87", (8, 7)),
    ("compute_89", (8, 9)),
    ("compute_90", (9, 0)),
    ("compute_100", (10, 0)),
    ("compute_120", (12, 0)),
];

/// One kernel module: the prelude plus one family's source.
pub struct Module {
    pub name: &'static str,
    pub source: String,
}

impl Module {
    /// The module's entry points, read from `ptx` (`.visible .entry name(`).
    pub fn entries(ptx: &str) -> Vec<String> {
        ptx.lines()
            .filter_map(|l| {
                let l = l.trim_start();
                let rest = l
                    .strip_prefix(".visible .entry ")
                    .or_else(|| l.strip_prefix(".entry "))?;
                Some(rest.split(['(', ' ']).next()?.to_string())
            })
            .collect()
    }
}

/// Every kernel module.
pub fn modules() -> Vec<Module> {
    SOURCES
        .iter()
        .map(|(name, src)| Module {
            name,
            source: format!("{PRELUDE}\n#line 1 \"{name}.cu\"\n{src}"),
        })
        .collect()
}

/// The NVRTC architecture for a device of compute capability `cap`: the newest in [`ARCHES`]
/// not newer than the device.
pub fn arch_for(cap: (i32, i32)) -> &'static str {
    ARCHES
        .iter()
        .rev()
        .find(|(_, c)| *c <= cap)
        .map_or(ARCHES[0].0, |(a, _)| a)
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library; no NVRTC call is made.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

const NVRTC_MISSING: &str = "NVRTC (libnvrtc.so.13 or .12), which compiles the kernels, is not \
     installed or not on the library path: install the CUDA toolkit's NVRTC, or \
     `pip install nvidia-cuda-nvrtc==13.0.88` and add its nvidia/cu13/lib to LD_LIBRARY_PATH";

/// The loaded NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    if !nvrtc_present() {
        return Err(NVRTC_MISSING.into());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is present (checked above); the call writes two ints we own.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcVersion failed: {r:?}"));
    }
    Ok((major, minor))
}

/// Compile `module` for `arch` (`compute_90`) to PTX text. Errors carry NVRTC's log.
pub fn compile(module: &Module, arch: &'static str) -> Result<String, String> {
    if !nvrtc_present() {
        return Err(NVRTC_MISSING.into());
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: OPTIONS.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{}.cu", module.name)),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(&module.source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => format!(
            "kernel module {} does not compile for {arch}:\n{}",
            module.name,
            log.to_string_lossy()
        ),
        other => format!("kernel module {} for {arch}: {other:?}", module.name),
    })?;
    Ok(ptx.to_src())
}

/// The kernel cache directory.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("LONGTAKE_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("longtake/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/longtake/kernels"))
}

/// FNV-1a, 64 bits: a stable hash for cache keys (not for security).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// [`compile`], through the on-disk cache.
pub fn compile_cached(module: &Module, arch: &'static str) -> Result<String, String> {
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        module.source.as_bytes(),
        arch.as_bytes(),
        OPTIONS.join(" ").as_bytes(),
        format!("{major}.{minor}").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{}-{arch}-{key:016x}.ptx", module.name)));
    if let Some(p) = &path
        && let Ok(text) = std::fs::read_to_string(p)
        && text.contains(".entry")
    {
        return Ok(text);
    }
    let text = compile(module, arch)?;
    if let Some(p) = &path
        && let Some(dir) = p.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        // One temporary file per call: threads compiling the same module at once must not
        // truncate each other's file before it is renamed.
        let tmp = crate::io::temp_sibling(p);
        if std::fs::write(&tmp, &text).is_err() || std::fs::rename(&tmp, p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_is_the_newest_not_newer_than_the_device() {
        assert_eq!(arch_for((8, 0)), "compute_80");
        assert_eq!(arch_for((8, 6)), "compute_86");
        assert_eq!(arch_for((8, 8)), "compute_87");
        assert_eq!(arch_for((9, 0)), "compute_90");
        assert_eq!(arch_for((10, 3)), "compute_100");
        assert_eq!(arch_for((13, 0)), "compute_120");
    }

    #[test]
    fn entries_are_read_from_ptx() {
        let ptx = "//\n.visible .entry add_f32(\n\t.param .u64 a\n)\n.entry local_k (\n";
        assert_eq!(Module::entries(ptx), ["add_f32", "local_k"]);
    }

    #[test]
    fn sources_use_no_cuda_header() {
        for m in modules() {
            assert!(
                !m.source.contains("#include"),
                "{}: a driver-only machine has no CUDA headers",
                m.name
            );
        }
    }
}
