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
