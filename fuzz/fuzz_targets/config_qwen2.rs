#![no_main]
//! libFuzzer target `config_qwen2`: see [`r1_fuzz::config_qwen2`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::config_qwen2(data);
});
