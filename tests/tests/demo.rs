//! The demo `cargo xtask demo` runs keeps working: every pod row is printed, the allowed pods get
//! credentials, the others the agent's reason, and the final no-leak line appears.

use std::time::Duration;

use kube2iam_tests::process::output_within;

#[test]
fn the_demo_prints_its_table_and_the_no_leak_line() {
    kube2iam_tests::require_root();
    let output = output_within(
        &mut std::process::Command::new(env!("CARGO_BIN_EXE_k2i-demo")),
        Duration::from_secs(180),
        "k2i-demo",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the demo failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for client in ["curl", "botocore", "aws-config"] {
        let rows = stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(2) == Some(client))
            .count();
        assert_eq!(rows, 4, "one {client} row per pod:\n{stdout}");
    }
    let granted = stdout.lines().filter(|l| l.contains(" expires ")).count();
    assert_eq!(
        granted, 6,
        "two pods x three clients get credentials:\n{stdout}"
    );
    assert!(
        stdout.contains("HTTP 404: pod shop/plain has no iam.amazonaws.com/role annotation"),
        "{stdout}"
    );
    assert!(
        stdout.contains("HTTP 403: pod finance/admin has role"),
        "{stdout}"
    );
    assert!(stdout.contains("reached no pod"), "{stdout}");
}
