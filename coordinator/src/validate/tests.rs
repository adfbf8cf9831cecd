//! Validation tests: every field's bad values refused by name, defaults from the model.

use super::*;

fn base() -> RenderSpec {
    RenderSpec {
        prompt: "a lighthouse at dusk".into(),
        length: Some(Length::DurationS(60.0)),
        ..Default::default()
    }
}

fn model_info(spec: &RenderSpec) -> ModelInfo {
    use crate::geometry::{ModelCatalog, Wan21Catalog};
    Wan21Catalog.model_info(spec.model.trim()).unwrap()
}

fn check(spec: RenderSpec) -> Result<ValidSpec, InvalidField> {
    validate(&spec, &Limits::default(), &model_info(&spec), "renders", 7)
}

fn field_of(spec: RenderSpec) -> &'static str {
    check(spec).expect_err("should be rejected").field
}

#[test]
fn geometry_and_defaults_come_from_the_model() {
    use crate::geometry::ModelDefaults;
    let info = ModelInfo {
        latent: LatentGeometry {
            channels: 8,
            spatial_factor: 4,
            temporal_factor: 2,
            size_multiple: 8,
        },
        native_window: 9,
        defaults: ModelDefaults {
            width: 96,
            height: 72,
            fps: 8,
            steps: 7,
            guidance: 3.0,
            window: 9,
            overlap: 2,
            stitching: StitchingMode::Autoregressive,
            noise_layout: NoiseMode::Rescheduled,
            hold_noise: 0.4,
            hold_release: 0.3,
        },
    };
    let run = |spec: RenderSpec| validate(&spec, &Limits::default(), &info, "renders", 7);
    let v = run(RenderSpec {
        length: Some(Length::DurationS(2.0)),
        ..base()
    })
    .unwrap();
    // 2 s at 8 fps: 16 frames → 2k + 1 = 17; latent frames (17 − 1) / 2 + 1 = 9.
    assert_eq!(v.num_frames, 17);
    assert_eq!(v.latent_shape(), [8, 9, 72 / 4, 96 / 4]);
    assert_eq!((v.steps, v.guidance, v.window, v.overlap), (7, 3.0, 9, 2));
    // The model's stitching and noise layout when the request leaves them unset; the
    // request's when it names them.
    assert_eq!(v.stitching, StitchingMode::Autoregressive);
    assert_eq!(v.noise_layout, NoiseMode::Rescheduled);
    assert_eq!((v.hold_noise, v.hold_release), (0.4, 0.3));
    assert_eq!(
        run(RenderSpec {
            length: Some(Length::DurationS(2.0)),
            noise_layout: NoiseLayout::Independent as i32,
            ..base()
        })
        .unwrap()
        .noise_layout,
        NoiseMode::Independent
    );
    let v = run(RenderSpec {
        length: Some(Length::DurationS(2.0)),
        stitching: Stitching::Codenoise as i32,
        ..base()
    })
    .unwrap();
    assert_eq!(v.stitching, StitchingMode::Codenoise);
    // The model's hold_noise and hold_release are for its autoregressive windows; codenoise
    // holds nothing.
    assert_eq!((v.hold_noise, v.hold_release), (1.0, 0.0));
    let e = run(RenderSpec {
        length: Some(Length::NumFrames(20)),
        ..base()
    })
    .unwrap_err();
    assert_eq!(e.field, "num_frames");
    assert!(e.reason.contains("2k + 1"), "{}", e.reason);
    let e = run(RenderSpec {
        width: Some(100),
        ..base()
    })
    .unwrap_err();
    assert!(e.reason.contains("multiple of 8"), "{}", e.reason);
    let e = run(RenderSpec {
        window: Some(10),
        ..base()
    })
    .unwrap_err();
    assert!(e.reason.contains("1..=9"), "{}", e.reason);
}

#[test]
fn smoke_defaults_apply() {
    // No model: the default built-in model, by name.
    let v = check(base()).unwrap();
    assert_eq!(v.model, DEFAULT_MODEL);
    assert!(!v.is_smoke() && v.is_builtin());
    let v = check(RenderSpec {
        model: SMOKE_MODEL.into(),
        ..base()
    })
    .unwrap();
    assert!(v.is_smoke());
    assert_eq!(v.num_frames, 961);
    assert_eq!(v.latent_frames(), 241);
    assert_eq!((v.width, v.height, v.fps, v.steps), (64, 64, 16, 4));
    assert_eq!((v.window, v.overlap), (21, 4));
    assert_eq!(v.guidance, 5.0);
    assert_eq!(v.seed, 7);
    assert_eq!(v.stitching, StitchingMode::Codenoise);
    assert_eq!(v.output, "renders");
    assert_eq!(v.latent_shape(), [16, 241, 8, 8]);
}

#[test]
fn model_defaults_apply() {
    let v = check(RenderSpec {
        model: "/models/wan2.1-t2v-1.3b".into(),
        seed: Some(42),
        ..base()
    })
    .unwrap();
    assert_eq!((v.width, v.height, v.fps, v.steps), (832, 480, 16, 50));
    assert_eq!(v.seed, 42);
    assert_eq!(v.flow_shift, None);
    assert_eq!(v.latent_shape(), [16, 241, 60, 104]);
}

#[test]
fn frames_rule() {
    assert_eq!(frames_for_duration(60.0, 16, 4), 961);
    assert_eq!(frames_for_duration(5.0, 16, 4), 81);
    assert_eq!(frames_for_duration(0.1, 40, 4), 5);
    assert_eq!(frames_for_duration(1.0, 1, 4), 5);
    assert_eq!(frames_for_duration(0.01, 16, 4), 5);
    assert_eq!(frames_for_duration(600.0, 16, 4), 9601);
}

#[test]
fn to_proto_round_trips() {
    let v = check(base()).unwrap();
    let again = validate(
        &v.to_proto(None),
        &Limits::default(),
        &model_info(&v.to_proto(None)),
        "x",
        99,
    )
    .unwrap();
    assert_eq!(again, v);
}

#[test]
fn prompt() {
    assert_eq!(
        field_of(RenderSpec {
            prompt: "".into(),
            ..base()
        }),
        "prompt"
    );
    assert_eq!(
        field_of(RenderSpec {
            prompt: " \n\t".into(),
            ..base()
        }),
        "prompt"
    );
    assert_eq!(
        field_of(RenderSpec {
            prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
            ..base()
        }),
        "prompt"
    );
    assert_eq!(
        field_of(RenderSpec {
            negative_prompt: "x".repeat(MAX_PROMPT_BYTES + 1),
            ..base()
        }),
        "negative_prompt"
    );
}

#[test]
fn length() {
    let e = check(RenderSpec {
        length: None,
        ..base()
    })
    .unwrap_err();
    assert_eq!(e.field, "duration_s");
    assert!(e.reason.contains("num_frames"));
    for d in [0.0, -1.0, 600.5, f64::NAN, f64::INFINITY] {
        let e = check(RenderSpec {
            length: Some(Length::DurationS(d)),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "duration_s", "{d}");
        assert!(e.reason.contains("at most 600"), "{}", e.reason);
    }
    // 600 s at 120 fps is within the duration limit but over the frame limit.
    let e = check(RenderSpec {
        fps: Some(120),
        length: Some(Length::DurationS(600.0)),
        ..base()
    })
    .unwrap_err();
    assert_eq!(e.field, "duration_s");
    assert!(e.reason.contains("9601"), "{}", e.reason);
    for f in [0, 9605, 80, 82] {
        let e = check(RenderSpec {
            length: Some(Length::NumFrames(f)),
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "num_frames", "{f}");
    }
    let e = check(RenderSpec {
        length: Some(Length::NumFrames(80)),
        ..base()
    })
    .unwrap_err();
    assert!(e.reason.contains("77 or 81"), "{}", e.reason);
    let v = check(RenderSpec {
        length: Some(Length::NumFrames(81)),
        ..base()
    })
    .unwrap();
    assert_eq!((v.num_frames, v.duration_s), (81, None));
}

#[test]
fn fps() {
    assert_eq!(
        field_of(RenderSpec {
            fps: Some(0),
            ..base()
        }),
        "fps"
    );
    assert_eq!(
        field_of(RenderSpec {
            fps: Some(121),
            ..base()
        }),
        "fps"
    );
    assert_eq!(
        check(RenderSpec {
            fps: Some(24),
            ..base()
        })
        .unwrap()
        .num_frames,
        1441
    );
}

#[test]
fn sides() {
    for (w, h, field) in [
        (0, 64, "width"),
        (65, 64, "width"),
        (4112, 64, "width"),
        (64, 0, "height"),
        (64, 24, "height"),
        (64, 4112, "height"),
    ] {
        assert_eq!(
            field_of(RenderSpec {
                width: Some(w),
                height: Some(h),
                ..base()
            }),
            field,
            "{w}x{h}"
        );
    }
    assert!(
        check(RenderSpec {
            width: Some(4096),
            height: Some(16),
            ..base()
        })
        .is_ok()
    );
}

#[test]
fn steps_guidance_shift() {
    assert_eq!(
        field_of(RenderSpec {
            steps: Some(0),
            ..base()
        }),
        "steps"
    );
    assert_eq!(
        field_of(RenderSpec {
            steps: Some(1001),
            ..base()
        }),
        "steps"
    );
    for g in [f32::NAN, f32::INFINITY, -0.5] {
        assert_eq!(
            field_of(RenderSpec {
                guidance: Some(g),
                ..base()
            }),
            "guidance"
        );
    }
    assert_eq!(
        check(RenderSpec {
            guidance: Some(0.0),
            ..base()
        })
        .unwrap()
        .guidance,
        0.0
    );
    for s in [0.0, -1.0, f32::NAN] {
        assert_eq!(
            field_of(RenderSpec {
                flow_shift: Some(s),
                ..base()
            }),
            "flow_shift"
        );
    }
    assert_eq!(
        check(RenderSpec {
            flow_shift: Some(3.0),
            ..base()
        })
        .unwrap()
        .flow_shift,
        Some(3.0)
    );
}

#[test]
fn window_and_overlap() {
    assert_eq!(
        field_of(RenderSpec {
            window: Some(0),
            ..base()
        }),
        "window"
    );
    let e = check(RenderSpec {
        window: Some(22),
        ..base()
    })
    .unwrap_err();
    assert_eq!(e.field, "window");
    assert!(e.reason.contains("1..=21"));
    let e = check(RenderSpec {
        window: Some(8),
        overlap: Some(8),
        ..base()
    })
    .unwrap_err();
    assert_eq!(e.field, "overlap");
    assert!(e.reason.contains("0..=7"), "{}", e.reason);
    // An explicit 0 overlap is allowed; a short window clamps the default overlap.
    assert_eq!(
        check(RenderSpec {
            overlap: Some(0),
            ..base()
        })
        .unwrap()
        .overlap,
        0
    );
    let v = check(RenderSpec {
        window: Some(3),
        ..base()
    })
    .unwrap();
    assert_eq!((v.window, v.overlap), (3, 2));
}

#[test]
fn noise_layout() {
    for bad in [3, -1] {
        let e = check(RenderSpec {
            noise_layout: bad,
            ..base()
        })
        .unwrap_err();
        assert_eq!(e.field, "noise_layout");
        assert!(
            e.to_string().contains("INDEPENDENT (1), RESCHEDULED (2)"),
            "{e}"
        );
    }
    // Unset: independent (the model's default here); the request's layout otherwise, and it
    // travels on the wire.
    assert_eq!(check(base()).unwrap().noise_layout, NoiseMode::Independent);
    let v = check(RenderSpec {
        noise_layout: NoiseLayout::Rescheduled as i32,
        ..base()
    })
    .unwrap();
    assert_eq!(v.noise_layout, NoiseMode::Rescheduled);
    assert_eq!(
        v.to_proto(None).noise_layout,
        NoiseLayout::Rescheduled as i32
    );
}

/// `hold_noise` and `hold_release`: each from 0 to 1, autoregressive windows only.
#[test]
fn hold_fields() {
    let ar = Stitching::Autoregressive as i32;
    let spec = |field: &str, value: f32, stitching: i32| {
        let mut s = RenderSpec {
            stitching,
            ..base()
        };
        match field {
            "hold_noise" => s.hold_noise = Some(value),
            _ => s.hold_release = Some(value),
        }
        s
    };
    for field in ["hold_noise", "hold_release"] {
        for bad in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let e = check(spec(field, bad, ar)).unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.reason.contains("from 0 to 1"), "{e}");
        }
        // Only autoregressive windows hold frames: set with another strategy, it is refused.
        let e = check(spec(field, 0.5, Stitching::Codenoise as i32)).unwrap_err();
        assert_eq!(e.field, field);
        assert!(
            e.reason.contains("CODENOISE") && e.reason.contains("AUTOREGRESSIVE"),
            "{e}"
        );
        for h in [0.0, 0.5, 1.0] {
            let v = check(spec(field, h, ar)).unwrap();
            let wire = v.to_proto(None);
            let (got, on_wire) = match field {
                "hold_noise" => (v.hold_noise, wire.hold_noise),
                _ => (v.hold_release, wire.hold_release),
            };
            assert_eq!(got, h);
            assert_eq!(on_wire, Some(h));
        }
    }
    // Unset: the model's (1 and 0 here); the request's otherwise, on the wire too.
    let v = check(RenderSpec {
        stitching: ar,
        ..base()
    })
    .unwrap();
    assert_eq!((v.hold_noise, v.hold_release), (1.0, 0.0));
}

#[test]
fn stitching() {
    assert_eq!(
        field_of(RenderSpec {
            stitching: 9,
            ..base()
        }),
        "stitching"
    );
    assert_eq!(
        field_of(RenderSpec {
            stitching: -1,
            ..base()
        }),
        "stitching"
    );
    let v = check(RenderSpec {
        stitching: Stitching::Autoregressive as i32,
        ..base()
    })
    .unwrap();
    assert_eq!(v.stitching, StitchingMode::Autoregressive);
}

#[test]
fn output() {
    for bad in [
        "ftp://host/x",
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://ab",
        "a\0b",
    ] {
        assert_eq!(
            field_of(RenderSpec {
                output: bad.into(),
                ..base()
            }),
            "output",
            "{bad}"
        );
    }
    let e = validate(&base(), &Limits::default(), &model_info(&base()), "", 1).unwrap_err();
    assert_eq!(e.field, "output");
    let file = tempfile::NamedTempFile::new().unwrap();
    let e = check(RenderSpec {
        output: file.path().to_str().unwrap().into(),
        ..base()
    })
    .unwrap_err();
    assert!(e.reason.contains("not a directory"), "{}", e.reason);
    for good in ["s3://renders", "s3://my-bucket.eu/a/b", "out/dir", "/tmp"] {
        assert_eq!(
            check(RenderSpec {
                output: good.into(),
                ..base()
            })
            .unwrap()
            .output,
            good
        );
    }
}

fn noise_file(shape: &[usize], dtype: safetensors::Dtype) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let width = if dtype == safetensors::Dtype::F32 {
        4
    } else {
        2
    };
    let data = vec![0u8; n * width];
    let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &data).unwrap();
    safetensors::serialize([("noise", view)], None).unwrap()
}

#[test]
fn initial_noise() {
    let spec = |noise: Vec<u8>| RenderSpec {
        length: Some(Length::NumFrames(9)),
        initial_noise: Some(noise),
        ..base()
    };
    let ok = check(spec(noise_file(&[1, 16, 3, 8, 8], safetensors::Dtype::F32))).unwrap();
    assert!(ok.has_initial_noise);
    for bad in [
        noise_file(&[1, 16, 4, 8, 8], safetensors::Dtype::F32),
        noise_file(&[1, 16, 3, 8, 8], safetensors::Dtype::F16),
        b"not safetensors".to_vec(),
    ] {
        assert_eq!(field_of(spec(bad)), "initial_noise");
    }
}

#[test]
fn status_names_the_field() {
    let status: tonic::Status = check(RenderSpec {
        steps: Some(0),
        ..base()
    })
    .unwrap_err()
    .into();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().starts_with("steps: "),
        "{}",
        status.message()
    );
}
