//! Replays every committed fuzz input — the corpora under `fuzz/corpus/<target>/` and the crash
//! reproducers under `fuzz/regressions/<target>/` — through the same property checks the
//! cargo-fuzz targets run (`fuzz/src/lib.rs`, compiled in here), on stable Rust and without
//! libFuzzer. `cargo xtask fuzz` grows the corpora; this keeps what they found in CI.

use std::{
    fs,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    time::Duration,
};

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod properties;

/// Unoptimized builds compile regexes far slower than the fuzzers' release builds.
const BUDGET: Duration = Duration::from_secs(10);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let corpus = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target}/ is empty or missing: run `cargo xtask fuzz --target {target}` and \
         commit the corpus"
    );
    let regressions = inputs(&fuzz_dir().join("regressions").join(target));
    let mut failures = Vec::new();
    for file in corpus.iter().chain(&regressions) {
        let data = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            properties::check(target, &data, BUDGET);
        }));
        if let Err(cause) = result {
            let message = cause
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| cause.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            failures.push(format!("{}: {message}", file.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} {target} inputs break a property:\n{}",
        failures.len(),
        corpus.len() + regressions.len(),
        failures.join("\n")
    );
    eprintln!(
        "{target}: {} corpus files and {} reproducers hold",
        corpus.len(),
        regressions.len()
    );
}

#[test]
fn path_route_corpus_holds() {
    replay("path_route");
}

#[test]
fn path_spellings_corpus_holds() {
    replay("path_spellings");
}

#[test]
fn annotations_corpus_holds() {
    replay("annotations");
}

#[test]
fn allowed_roles_corpus_holds() {
    replay("allowed_roles");
}

#[test]
fn every_target_has_a_replay_test() {
    let here = include_str!("fuzz_corpus.rs");
    for target in properties::TARGETS {
        assert!(
            here.contains(&format!("replay(\"{target}\")")),
            "fuzz target {target} has no replay test here"
        );
    }
}
