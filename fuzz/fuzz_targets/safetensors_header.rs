#![no_main]
//! libFuzzer target `safetensors_header`: see [`r1_fuzz::safetensors_header`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::safetensors_header(data);
});
