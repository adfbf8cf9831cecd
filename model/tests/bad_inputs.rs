//! Bad checkpoints, configs and inputs give errors that name the tensor / key / input and say
//! what was expected, never a panic.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::fixture;
use longtake_model::backend::Backend;
use longtake_model::backend::cpu::Cpu;
use longtake_model::comm::ThreadComm;
use longtake_model::wan::{DitInputs, TextContext, WanTransformer};
use safetensors::Dtype;

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A copy of the `tiny` fixture's transformer directory.
fn copy_tiny() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("dit/tiny/transformer");
    let dst = tmp.path().join("transformer");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    (tmp, dst)
}

fn weights(dir: &Path) -> PathBuf {
    dir.join("diffusion_pytorch_model.safetensors")
}

/// Rewrite a safetensors file through `edit`.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    struct Raw(Dtype, Vec<usize>, Vec<u8>);
    impl safetensors::View for &Raw {
        fn dtype(&self) -> Dtype {
            self.0
        }
        fn shape(&self) -> &[usize] {
            &self.1
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.2)
        }
        fn data_len(&self) -> usize {
            self.2.len()
        }
    }
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: Tensors = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let raws: Vec<(String, Raw)> = map
        .into_iter()
        .map(|(n, (d, s, b))| (n, Raw(d, s, b)))
        .collect();
    let out = safetensors::serialize(raws.iter().map(|(n, r)| (n.clone(), r)), None).unwrap();
    std::fs::write(path, out).unwrap();
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&p, v.to_string()).unwrap();
}

fn load_err(dir: &Path, world: usize) -> String {
    match WanTransformer::load(dir, &Cpu, 0, world) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} should mention {p:?}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let (_t, dir) = copy_tiny();
    rewrite(&weights(&dir), |m| {
        m.remove("blocks.1.attn2.to_k.weight");
    });
    assert_has(
        &load_err(&dir, 1),
        &["missing tensor", "blocks.1.attn2.to_k.weight", "[64, 64]"],
    );
}

#[test]
fn extra_tensor_is_named() {
    let (_t, dir) = copy_tiny();
    rewrite(&weights(&dir), |m| {
        m.insert(
            "blocks.7.attn1.to_q.weight".into(),
            (Dtype::F32, vec![1], vec![0; 4]),
        );
    });
    assert_has(
        &load_err(&dir, 1),
        &["unexpected tensor", "blocks.7.attn1.to_q.weight"],
    );
}

#[test]
fn wrong_shape_names_expected_and_found() {
    let (_t, dir) = copy_tiny();
    rewrite(&weights(&dir), |m| {
        m.insert(
            "proj_out.bias".into(),
            (Dtype::F32, vec![63], vec![0; 63 * 4]),
        );
    });
    assert_has(&load_err(&dir, 1), &["proj_out.bias", "[64]", "[63]"]);
}

#[test]
fn wrong_dtype_is_named() {
    let (_t, dir) = copy_tiny();
    rewrite(&weights(&dir), |m| {
        m.insert(
            "scale_shift_table".into(),
            (Dtype::I32, vec![1, 2, 64], vec![0; 128 * 4]),
        );
    });
    assert_has(
        &load_err(&dir, 1),
        &["scale_shift_table", "I32", "F32, BF16, F16"],
    );
}

#[test]
fn missing_weights_file_and_broken_index() {
    let (_t, dir) = copy_tiny();
    std::fs::remove_file(weights(&dir)).unwrap();
    assert_has(&load_err(&dir, 1), &["diffusion_pytorch_model.safetensors"]);
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors.index.json"),
        r#"{"weight_map": {"proj_out.bias": "part-00001.safetensors"}}"#,
    )
    .unwrap();
    assert_has(&load_err(&dir, 1), &["part-00001.safetensors"]);
}

#[test]
fn truncated_weights_file_is_an_error() {
    let (_t, dir) = copy_tiny();
    let bytes = std::fs::read(weights(&dir)).unwrap();
    std::fs::write(weights(&dir), &bytes[..bytes.len() / 2]).unwrap();
    assert_has(&load_err(&dir, 1), &["safetensors"]);
}

#[test]
fn configs_the_code_cannot_run_name_the_key() {
    let cases: [(&str, serde_json::Value, &[&str]); 6] = [
        (
            "attention_head_dim",
            31.into(),
            &["attention_head_dim", "even"],
        ),
        ("image_dim", 1280.into(), &["image_dim", "not supported"]),
        (
            "num_attention_heads",
            "two".into(),
            &["num_attention_heads", "integer"],
        ),
        (
            "_class_name",
            "UNet3DConditionModel".into(),
            &["_class_name", "WanTransformer3DModel"],
        ),
        (
            "patch_size",
            serde_json::json!([1, 2]),
            &["patch_size", "three"],
        ),
        ("eps", (-1.0).into(), &["eps"]),
    ];
    for (key, value, parts) in cases {
        let (_t, dir) = copy_tiny();
        edit_config(&dir, key, value);
        assert_has(&load_err(&dir, 1), parts);
    }
}

#[test]
fn tp_must_divide_heads() {
    let (_t, dir) = copy_tiny();
    assert_has(
        &load_err(&dir, 3),
        &["tp = 3", "num_attention_heads (2)", "allowed: 1, 2"],
    );
}

#[test]
fn bad_forward_inputs_are_named() {
    let dir = fixture("dit/tiny/transformer");
    let model = WanTransformer::load(&dir, &Cpu, 0, 1).unwrap();
    let comm = ThreadComm::group(1).unwrap().remove(0);
    let ctx = TextContext::from_host(&Cpu, 2, 4, 32, &[0.5; 2 * 4 * 32]).unwrap();
    let forward = |shape: &[usize], ts: &[f32], ctx: &TextContext<Cpu>| -> String {
        let n = shape.iter().product();
        let latents = Cpu.upload_f32(shape, vec![0.1; n]).unwrap();
        match model.forward(
            &comm,
            &DitInputs {
                latents: &latents,
                timesteps: ts,
                context: ctx,
            },
        ) {
            Ok(_) => panic!("forward with {shape:?} / {ts:?} should fail"),
            Err(e) => e.to_string(),
        }
    };
    assert_has(
        &forward(&[2, 16, 1, 4, 4], &[1.0], &ctx),
        &["timestep", "has 1 values", "(2)"],
    );
    assert_has(
        &forward(&[2, 16, 1, 4, 4], &[1.0, f32::NAN], &ctx),
        &["timestep", "NaN"],
    );
    assert_has(
        &forward(&[2, 15, 1, 4, 4], &[1.0, 2.0], &ctx),
        &["hidden_states", "16"],
    );
    assert_has(
        &forward(&[2, 16, 1, 4, 5], &[1.0, 2.0], &ctx),
        &["hidden_states", "width 5", "patch"],
    );
    assert_has(
        &forward(&[2, 16, 1, 4], &[1.0, 2.0], &ctx),
        &["hidden_states", "[batch"],
    );
    assert_has(
        &forward(&[2, 16, 1, 66, 4], &[1.0, 2.0], &ctx),
        &["rope_max_seq_len"],
    );
    let wide = TextContext::from_host(&Cpu, 2, 4, 31, &[0.5; 2 * 4 * 31]).unwrap();
    assert_has(
        &forward(&[2, 16, 1, 4, 4], &[1.0, 2.0], &wide),
        &["encoder_hidden_states", "text_dim 32"],
    );
    let one = TextContext::from_host(&Cpu, 1, 4, 32, &[0.5; 4 * 32]).unwrap();
    assert_has(
        &forward(&[2, 16, 1, 4, 4], &[1.0, 2.0], &one),
        &["encoder_hidden_states", "batch 1"],
    );
    let bad = TextContext::from_host(&Cpu, 1, 4, 32, &[f32::INFINITY; 4 * 32]);
    assert!(bad.is_err_and(|e| e.to_string().contains("finite")));
}

/// A copy of a fixture directory (recursively) in a fresh temporary directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The tokenizer's files decide how it loads: any class in model_index.json that comes with a
/// tokenizer.json is accepted (transformers 5 writes `TokenizersBackend`); without one the
/// error names the file.
#[test]
fn tokenizer_class_names_with_a_tokenizer_json_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pipe");
    copy_dir(&fixture("pipeline/tiny"), &dir);
    let index = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    for class in ["TokenizersBackend", "T5TokenizerFast", "AnyFutureTokenizer"] {
        std::fs::write(
            &index,
            text.replace("\"T5Tokenizer\"", &format!("\"{class}\"")),
        )
        .unwrap();
        longtake_model::pipeline::ModelDir::open(&dir).unwrap_or_else(|e| panic!("{class}: {e}"));
    }
    std::fs::remove_file(dir.join("tokenizer/tokenizer.json")).unwrap();
    let e = longtake_model::pipeline::ModelDir::open(&dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("tokenizer"),
        "{e}"
    );
}

/// Attention over zero keys is an error naming the op, not a panic.
#[test]
fn attention_without_keys_is_an_error() {
    let q = Cpu.upload_f32(&[1, 3, 2, 4], vec![0.5; 24]).unwrap();
    let k = Cpu.upload_f32(&[1, 0, 2, 4], vec![]).unwrap();
    let v = Cpu.upload_f32(&[1, 0, 2, 4], vec![]).unwrap();
    let Err(e) = Cpu.attention(&q, &k, &v, None) else {
        panic!("attention over zero keys succeeded");
    };
    let e = e.to_string();
    assert!(e.contains("attention") && e.contains("zero keys"), "{e}");
}

/// Clamping to empty or NaN bounds is an error naming the op, not a panic.
#[test]
fn clamp_with_bad_bounds_is_an_error() {
    use longtake_model::backend::video_ops::VideoOps;
    let mut x = Cpu.upload_f32(&[2, 2], vec![0.0, 1.0, 2.0, 3.0]).unwrap();
    for (lo, hi) in [(1.0, 0.0), (f32::NAN, 1.0), (0.0, f32::NAN)] {
        let e = Cpu.clamp(&mut x, lo, hi).unwrap_err().to_string();
        assert!(e.contains("clamp"), "{e}");
    }
    Cpu.clamp(&mut x, 0.5, 2.5).unwrap();
    assert_eq!(Cpu.download(&x).unwrap(), [0.5, 1.0, 2.0, 2.5]);
}

/// Convolution weights the ops cannot apply (no causal window, a kernel larger than the padded
/// frame, no temporal taps) are errors naming the op, not panics.
#[test]
fn impossible_convolutions_are_errors() {
    use longtake_model::backend::video_ops::VideoOps;
    let x = Cpu.upload_f32(&[2, 3, 4, 5], vec![0.1; 120]).unwrap();
    let w0 = Cpu.upload_f32(&[2, 3, 0, 3, 3], vec![]).unwrap();
    let err = |r: longtake_model::Result<_>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let e = err(Cpu.conv3d_causal(&x, None, &w0, None));
    assert!(e.contains("conv3d_causal"), "{e}");
    let big = Cpu.upload_f32(&[2, 3, 7, 3], vec![0.1; 126]).unwrap();
    let e = err(Cpu.conv2d_down2(&x, &big, None));
    assert!(e.contains("conv2d_down2"), "{e}");
    let wt0 = Cpu.upload_f32(&[2, 3, 0, 1, 1], vec![]).unwrap();
    let e = err(Cpu.conv_time_down2(&x, &wt0, None));
    assert!(e.contains("conv_time_down2"), "{e}");
}
