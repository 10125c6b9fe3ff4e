#![no_main]
//! libFuzzer target `config_qwen3`: see [`r1_fuzz::config_qwen3`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::config_qwen3(data);
});
