#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sallyport_fuzz::ws_messages(data));
