//! Text encoding stops when asked: before any encoder layer when the stop flag is already set,
//! and between layers when it is set midway (a large encoder runs for seconds on a CPU, and a
//! cancelled render must free its worker within about a second).

use std::cell::Cell;

use longtake_model::Error;
use longtake_model::backend::cpu::Cpu;
use longtake_model::pipeline::{ClipRequest, WanPipeline};

fn request() -> ClipRequest {
    ClipRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: None,
        num_frames: 5,
        height: 64,
        width: 64,
        steps: 2,
        guidance: 5.0,
        flow_shift: None,
        seed: 0,
        noise: None,
    }
}

#[test]
fn text_encoding_stops_between_layers() {
    let dir = longtake_model::builtin::Builtin::Smoke.model_dir().unwrap();
    let pipe = WanPipeline::load(&dir, &Cpu).unwrap();
    let layers = pipe.dir.text_encoder.num_layers;
    assert!(layers >= 2, "the smoke encoder has {layers} layer(s)");

    // Already stopped: nothing is computed.
    let asked = Cell::new(0);
    let stop = || {
        asked.set(asked.get() + 1);
        true
    };
    match pipe.guided_until(&request(), &mut Vec::new(), &stop) {
        Err(Error::Cancelled(what)) => assert_eq!(what, "text encoding"),
        Err(e) => panic!("expected a cancellation, got {e}"),
        Ok(_) => panic!("expected a cancellation, got an encoding"),
    }
    assert_eq!(asked.get(), 1);

    // Stopped after the first layer of the prompt: the check runs before every layer.
    let asked = Cell::new(0);
    let stop = || {
        asked.set(asked.get() + 1);
        asked.get() > 1
    };
    assert!(matches!(
        pipe.guided_until(&request(), &mut Vec::new(), &stop),
        Err(Error::Cancelled(_))
    ));
    assert_eq!(asked.get(), 2);

    // Never stopped: the flag is asked once per layer of both prompts (CFG), and the result is
    // the plain encoding's.
    let asked = Cell::new(0);
    let stop = || {
        asked.set(asked.get() + 1);
        false
    };
    assert!(
        pipe.guided_until(&request(), &mut Vec::new(), &stop)
            .is_ok()
    );
    assert_eq!(asked.get(), 2 * layers);
}
