//! k2i-bench-client: the load and timing client `cargo xtask bench` runs inside pods (see
//! `kube2iam_tests::bench::client` for the modes and what they print).

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match kube2iam_tests::bench::client::main_with_args(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("k2i-bench-client: {e}");
            ExitCode::FAILURE
        }
    }
}
