#![no_main]
//! libFuzzer target `safetensors_index`: see [`r1_fuzz::safetensors_index`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::safetensors_index(data);
});
