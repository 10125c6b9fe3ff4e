#![no_main]
//! libFuzzer target `manifest`: see [`r1_fuzz::manifest`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::manifest(data);
});
