//! The samplers against diffusers' schedulers: sigma and timestep sequences and whole
//! trajectories driven by fixed velocities (`tools/make_fixtures.py`).

mod common;

use common::{fixture, read, rel_l2};
use longtake_model::sched::SchedulerConfig;

const TOLERANCE: f64 = 1e-5;

fn check(name: &str) {
    let dir = fixture(&format!("sched/{name}"));
    let cfg = SchedulerConfig::from_file(&dir.join("scheduler_config.json")).unwrap();
    let traj = dir.join("trajectory.safetensors");
    let (_, sigmas) = read(&traj, "sigmas");
    let (_, timesteps) = read(&traj, "timesteps");
    let (_, x_init) = read(&traj, "x_init");
    let (vs, velocities) = read(&traj, "model_outputs");
    let (_, samples) = read(&traj, "samples");
    let steps = vs[0];
    let mut s = cfg.build(steps).unwrap();
    let e_sig = rel_l2(s.sigmas(), &sigmas);
    let e_ts = rel_l2(s.timesteps(), &timesteps);
    assert!(
        e_sig <= TOLERANCE,
        "{name}: sigmas {:?} vs {:?}",
        s.sigmas(),
        sigmas
    );
    assert!(
        e_ts <= TOLERANCE,
        "{name}: timesteps {:?} vs {:?}",
        s.timesteps(),
        timesteps
    );
    let n = x_init.len();
    let mut x = x_init;
    let mut worst = 0.0f64;
    for i in 0..steps {
        s.step(&velocities[i * n..(i + 1) * n], &mut x).unwrap();
        let err = rel_l2(&x, &samples[i * n..(i + 1) * n]);
        worst = worst.max(err);
        assert!(
            err <= TOLERANCE,
            "{name}: step {i}: relative L2 error {err:.3e}"
        );
    }
    assert!(
        s.step(&velocities[..n], &mut x).is_err(),
        "a step past the end must fail"
    );
    eprintln!("sched {name}: sigmas {e_sig:.2e}, timesteps {e_ts:.2e}, worst step {worst:.3e}");
}

#[test]
fn unipc_10_steps_shift_3() {
    check("unipc_n10_s3");
}

#[test]
fn unipc_50_steps_shift_5() {
    check("unipc_n50_s5");
}

#[test]
fn unipc_2_steps() {
    check("unipc_n2_s3");
}

#[test]
fn euler_10_steps_shift_3() {
    check("euler_n10_s3");
}

#[test]
fn euler_7_steps_shift_1() {
    check("euler_n7_s1");
}
