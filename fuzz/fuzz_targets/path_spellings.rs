#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kube2iam_fuzz::path_spellings(data));
