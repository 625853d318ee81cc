//! The project's binaries and the test image for benches and end-to-end
//! tests: they belong to the root package, so cargo does not build the
//! agent's and runtime's binaries for them; they are brought up to date here
//! (a stale binary would run old code).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The test phone image: `CPH_TEST_IMAGE`, or built by the repo's script.
pub fn image() -> PathBuf {
    if let Some(p) = std::env::var_os("CPH_TEST_IMAGE") {
        return PathBuf::from(p);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = repo.join("target/images/cph-test-image.tar.gz");
    if !path.exists() {
        let ok = Command::new(repo.join("image/build-test-image.sh"))
            .arg(&path)
            .status()
            .expect("build test image")
            .success();
        assert!(ok, "building the test image failed");
    }
    path
}

/// Builds the workspace's binaries in this bench's profile and returns the
/// directory holding them (only returns it with `CPH_BINS_BUILT=1`: the
/// caller built every binary of this checkout already). The whole
/// workspace, as `cargo build` and `cargo test` build it: one package's
/// build would resolve its dependencies' features anew and compile them
/// again.
pub fn built() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    if std::env::var_os("CPH_BINS_BUILT").is_some_and(|v| v == "1") {
        return profile_dir;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--workspace", "--bins"]);
    // Cargo's per-crate variables of this process would make build scripts
    // that read them rebuild, here and in the next ordinary build.
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_BIN_NAME"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(k);
        }
    }
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    let ok = cmd.status().expect("cargo build").success();
    assert!(ok, "building the workspace's binaries failed");
    profile_dir
}
