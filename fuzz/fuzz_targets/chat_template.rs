#![no_main]
//! libFuzzer target `chat_template`: see [`r1_fuzz::chat_template`] for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = r1_fuzz::chat_template(data);
});
