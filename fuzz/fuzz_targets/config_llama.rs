#![no_main]
//! libFuzzer target `config_llama`: see [`r1_fuzz::config_llama`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::config_llama(data);
});
