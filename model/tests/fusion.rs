//! `window::fuse`, the one implementation of window fusion (halos at every co-denoising step and
//! the final latents before decoding): per latent frame, the sum over the covering windows in
//! ascending window order of weight × value, in f32 from 0.

use longtake_model::window::{Geometry, Part, WindowSpec, fuse};

#[test]
fn fusing_cross_fades_over_the_overlap() {
    // T = 5, windows [0,3) and [2,5), frame 2 shared half and half.
    let geo = Geometry {
        channels: 2,
        frames: 5,
        height: 1,
        width: 1,
    };
    let plan = [
        WindowSpec {
            start: 0,
            len: 3,
            weights: vec![1.0, 1.0, 0.5],
        },
        WindowSpec {
            start: 2,
            len: 3,
            weights: vec![0.5, 1.0, 1.0],
        },
    ];
    let part = |window: usize, value: f32| Part {
        window,
        start: plan[window].start,
        len: 3,
        data: vec![value; 2 * 3],
    };
    let (a, b) = (part(0, 1.0), part(1, 2.0));
    // The order parts are given in does not matter: ascending window order is applied.
    for parts in [[&a, &b], [&b, &a]] {
        let fused = fuse(&geo, &plan, 0..5, &parts).unwrap();
        assert_eq!(fused, [1.0, 1.0, 1.5, 2.0, 2.0, 1.0, 1.0, 1.5, 2.0, 2.0]);
    }
    // Rounding: each product rounded to f32, then added in window order from 0.
    let (x, y) = (part(0, 0.1), part(1, 0.7));
    let fused = fuse(&geo, &plan, 2..3, &[&y, &x]).unwrap();
    assert_eq!(
        fused[0].to_bits(),
        (0.0f32 + 0.5 * 0.1 + 0.5 * 0.7).to_bits()
    );
    // A frame no window covers is an error, not a zero.
    let e = fuse(&geo, &plan, 0..5, &[&a]).unwrap_err().to_string();
    assert!(e.contains("no prediction covers frame 3"), "{e}");
}
