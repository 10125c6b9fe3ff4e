//! Measures observer throughput and range-resolution time (dev tool; build it optimized:
//! `cargo run -p r1-calibration --example observer_throughput --config 'profile.dev.package.r1-calibration.opt-level=3'`).
//!
//! One batch = 256 tokens × 1536 channels (a 1.5B-shape MatMul input).
use r1_calibration::observer::{CalibrationMethod, ChannelMaxObserver, TensorObserver};
use std::time::Instant;

fn main() -> r1_calibration::Result<()> {
    let (tokens, hidden, batches) = (256usize, 1536usize, 32usize);
    let mut s = 0x1234_5678_9abc_def0u64;
    let batch: Vec<f32> = (0..tokens * hidden)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % hidden == 7 {
                u * 200.0
            } else {
                u * 4.0
            }
        })
        .collect();
    let mut obs = TensorObserver::new();
    let mut ch = ChannelMaxObserver::new(hidden);
    let t = Instant::now();
    for _ in 0..batches {
        obs.observe(&batch)?;
    }
    let hist_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..batches {
        ch.observe(&batch)?;
    }
    let ch_s = t.elapsed().as_secs_f64();
    let n = (tokens * hidden * batches) as f64;
    println!("histogram observe: {:.2} ns/value ({:.0} M values/s)", hist_s / n * 1e9, n / hist_s / 1e6);
    println!("channel-max observe: {:.2} ns/value", ch_s / n * 1e9);
    for m in [
        CalibrationMethod::Max,
        CalibrationMethod::Percentile { percentile: 99.99 },
        CalibrationMethod::Entropy,
        CalibrationMethod::Mse,
    ] {
        let t = Instant::now();
        let a = obs.amax(m, "x")?;
        println!("{m:>18}: amax {a:9.4} resolved in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
