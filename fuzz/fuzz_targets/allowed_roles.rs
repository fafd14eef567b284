#![no_main]

use std::time::Duration;

/// Compiling or matching one input slower than this is a failure (libFuzzer's own -timeout,
/// set by `cargo xtask fuzz`, catches anything that never returns).
const BUDGET: Duration = Duration::from_secs(1);

libfuzzer_sys::fuzz_target!(|data: &[u8]| kube2iam_fuzz::allowed_roles(data, BUDGET));
