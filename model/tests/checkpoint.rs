//! Window checkpoints: a window restored from a checkpoint taken after any step continues
//! bit-identically to one that never stopped, for UniPC (with its multistep history) and Euler;
//! a checkpoint of another window, or a damaged one, is refused without changing the window.

use longtake_model::sched::SchedulerConfig;
use longtake_model::window::{Geometry, WindowSpec, WindowState};

const GEO: Geometry = Geometry {
    channels: 4,
    frames: 9,
    height: 3,
    width: 5,
};

/// A deterministic pseudo-random velocity for (window values, step).
fn velocity(len: usize, step: usize) -> Vec<f32> {
    let mut s = 0x9e37_79b9_u32.wrapping_mul(step as u32 + 1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn noise() -> Vec<f32> {
    velocity(GEO.channels * GEO.frames * GEO.height * GEO.width, 999)
}

fn window(index: usize, sched: &SchedulerConfig, steps: usize) -> WindowState {
    let spec = WindowSpec {
        start: 2 + index,
        len: 5,
        weights: vec![1.0; 5],
    };
    WindowState::new(index, spec, &GEO, &noise(), sched, steps).unwrap()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn restored_windows_continue_bit_identically() {
    let steps = 7;
    for sched in [
        SchedulerConfig::wan_default(),
        SchedulerConfig::FlowMatchEuler {
            shift: 3.0,
            num_train_timesteps: 1000,
        },
    ] {
        let mut whole = window(0, &sched, steps);
        let len = whole.x.len();
        for i in 0..steps {
            whole.step(&velocity(len, i)).unwrap();
        }
        for k in 0..=steps {
            let mut first = window(0, &sched, steps);
            for i in 0..k {
                first.step(&velocity(len, i)).unwrap();
            }
            let cp = first.checkpoint().unwrap();
            let mut resumed = window(0, &sched, steps);
            resumed.restore(&cp).unwrap();
            assert_eq!(resumed.step_index(), k);
            for i in k..steps {
                resumed.step(&velocity(len, i)).unwrap();
            }
            assert_eq!(
                bits(&resumed.x),
                bits(&whole.x),
                "{sched:?}: resumed after step {k} differs"
            );
        }
    }
}

#[test]
fn foreign_or_damaged_checkpoints_are_refused() {
    let sched = SchedulerConfig::wan_default();
    let mut a = window(0, &sched, 5);
    let len = a.x.len();
    a.step(&velocity(len, 0)).unwrap();
    a.step(&velocity(len, 1)).unwrap();
    let cp = a.checkpoint().unwrap();
    let mut b = window(1, &sched, 5);
    let before = bits(&b.x);
    let e = b.restore(&cp).unwrap_err().to_string();
    assert!(e.contains("window 0") && e.contains("window 1"), "{e}");
    assert_eq!(bits(&b.x), before);
    assert_eq!(b.step_index(), 0);
    let mut c = window(0, &sched, 5);
    let before = bits(&c.x);
    for cut in [0, 8, cp.len() / 2, cp.len() - 1] {
        let e = c.restore(&cp[..cut]).unwrap_err().to_string();
        // The error names what was refused: the checkpoint (not only the file format).
        assert!(e.contains("checkpoint"), "cut at {cut}: {e}");
        assert_eq!(c.step_index(), 0);
        assert_eq!(bits(&c.x), before, "cut at {cut}: the window changed");
    }
    // A checkpoint past the sampler's last step is refused.
    let mut short = window(0, &sched, 1);
    let e = short.restore(&cp).unwrap_err().to_string();
    assert!(e.contains("step 2"), "{e}");
}
