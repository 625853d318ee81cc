//! `cph-agent plan`: the operator view of a placement, as a table and JSON.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../runtime/tests/fixtures/sysfs")
        .join(name)
}

/// The agent binary, run through `CPH_SPAWN_WRAPPER` when set: under QEMU
/// user emulation (cross/test.sh) a foreign-architecture child needs the
/// emulator in front of it.
fn agent() -> Command {
    let bin = env!("CARGO_BIN_EXE_cph-agent");
    match std::env::var("CPH_SPAWN_WRAPPER") {
        Ok(wrapper) if !wrapper.trim().is_empty() => {
            let mut parts = wrapper.split_whitespace();
            let mut cmd = Command::new(parts.next().unwrap_or_default());
            cmd.args(parts).arg(bin);
            cmd
        }
        _ => Command::new(bin),
    }
}

fn plan(args: &[&str]) -> std::process::Output {
    agent()
        .arg("plan")
        .args(args)
        .output()
        .expect("run cph-agent plan")
}

#[test]
fn json_lists_every_slot_with_cpus_node_and_gpu() {
    let root = fixture("hi1616-rx1-xlarge");
    let out = plan(&[
        "--sysfs-root",
        root.to_str().expect("utf-8 path"),
        "--strategy",
        "common_hosted_c60",
        "--capacity",
        "60",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let slots = v["slots"].as_array().expect("slots");
    assert_eq!(slots.len(), 60);
    for s in slots {
        assert_eq!(s["cpus"].as_array().expect("cpus").len(), 2);
        assert!(s["numa_node"].is_u64());
        assert!(s["gpu"].is_string());
    }
    assert_eq!(v["figures"]["gpu_imbalance"], 0);
    assert_eq!(v["figures"]["numa_local_share"], 1.0);
    assert!(v["figures"]["plan_time_us"].is_number());
}

#[test]
fn table_and_errors_are_for_people() {
    let root = fixture("vm-2cpu");
    let root = root.to_str().expect("utf-8 path");
    let out = plan(&[
        "--sysfs-root",
        root,
        "--strategy",
        "dev_small",
        "--capacity",
        "2",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SLOT"), "{text}");
    assert!(text.contains("max phones/cpu 2"), "{text}");

    let out = plan(&[
        "--sysfs-root",
        root,
        "--strategy",
        "common_hosted_c9",
        "--capacity",
        "2",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("known strategies"), "{err}");
    assert!(!err.contains("Stack backtrace"), "{err}");
}
