#![no_main]
//! libFuzzer target `generate_request`: see [`r1_fuzz::generate_request`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::generate_request(data);
});
