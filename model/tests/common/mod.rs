//! Shared helpers of the model crate's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use longtake_model::io::SafetensorsFile;

/// `model/tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Read one tensor of a safetensors file as f32.
pub fn read(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    SafetensorsFile::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_f32(name)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The GPU a test's CUDA variant runs on: `cuda:0`, in the precision `LONGTAKE_TEST_PRECISION`
/// names (`f32`, the default: exact attention; or `bf16`: tensor-core attention). These variants
/// are `#[ignore]`d in the default suite (no GPU there) and run by `scripts/gpu-check`, once per
/// precision.
pub fn cuda() -> longtake_model::backend::cuda::Cuda {
    use longtake_model::backend::cuda::Cuda;
    Cuda::new(0, precision()).unwrap_or_else(|e| panic!("this test needs a GPU: {e}"))
}

fn precision() -> longtake_model::backend::cuda::Precision {
    use longtake_model::backend::cuda::Precision;
    match std::env::var("LONGTAKE_TEST_PRECISION") {
        Ok(p) => Precision::parse(&p)
            .unwrap_or_else(|| panic!("LONGTAKE_TEST_PRECISION={p:?}; allowed: f32, bf16")),
        Err(_) => Precision::F32,
    }
}

/// Relative L2 error allowed for a CUDA run against the reference: 1e-4 in f32 precision,
/// 1e-2 in bf16 (the GPU check's bounds).
pub fn cuda_tolerance() -> f64 {
    match precision() {
        longtake_model::backend::cuda::Precision::F32 => 1e-4,
        longtake_model::backend::cuda::Precision::Bf16 => 1e-2,
    }
}
