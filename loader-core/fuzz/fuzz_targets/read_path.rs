#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| shardlock::fuzz_hooks::read_path(data));
