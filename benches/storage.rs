//! Phone volume create+delete, reset and image update on a real btrfs pool (loop-backed
//! sparse file), for images of 100 MB and 1 GB, next to a plain `cp -a` of
//! the same image tree (the anchor: what unpacking per phone costs). Clone
//! time should not depend on the image size. Writes
//! `target/bench-report/storage.json`. Under `cargo test --all-targets` the
//! images are 1 MB and 4 MB and no report is written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cph_runtime::storage::{BtrfsConfig, BtrfsStorage, PoolDevice, Storage};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

const FILE_BYTES: usize = 256 << 10;

/// A tree of `bytes` in 256 KiB files under `dir`.
fn make_tree(dir: &Path, bytes: usize) {
    let data: Vec<u8> = (0..FILE_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..bytes.div_ceil(FILE_BYTES) {
        let sub = dir.join(format!("d{}", i / 64));
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(sub.join(format!("f{i}")), &data).expect("write");
    }
}

fn import_tree(s: &BtrfsStorage, id: &str, dir: &Path) {
    let mut child = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .spawn()
        .expect("tar");
    let out = child.stdout.take().expect("stdout");
    s.import_image(id, Box::new(out)).expect("import");
    assert!(child.wait().expect("tar").success());
}

fn mean(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len().max(1) as f64 * 1e3
}

fn main() {
    if !cph_runtime::privilege::check("storage bench") {
        return;
    }
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED storage bench: mkfs.btrfs is not installed");
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let sizes: &[(&str, usize)] = if full {
        &[("100MB", 100 << 20), ("1GB", 1 << 30)]
    } else {
        &[("1MB", 1 << 20), ("4MB", 4 << 20)]
    };
    let mut c = Criterion::default().sample_size(10);
    c = if full {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args()
    } else {
        c.warm_up_time(Duration::from_millis(20))
            .measurement_time(Duration::from_millis(100))
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool_bytes: u64 = if full { 4 << 30 } else { 256 << 20 };
    let s = BtrfsStorage::new(BtrfsConfig {
        device: PoolDevice::LoopFile {
            path: tmp.path().join("pool.img"),
            size_bytes: pool_bytes,
        },
        mount_point: tmp.path().join("mnt"),
        owner: "bench".into(),
        max_share_bytes: 16 << 20,
    });
    struct Teardown<'a>(&'a BtrfsStorage);
    impl Drop for Teardown<'_> {
        fn drop(&mut self) {
            let _ = self.0.teardown();
        }
    }
    s.prepare().expect("prepare");
    let _t = Teardown(&s);

    let mut metrics = Vec::new();
    let mut create_ms = Vec::new();
    for &(label, bytes) in sizes {
        let tree = tmp.path().join(format!("tree-{label}"));
        make_tree(&tree, bytes);
        let image = format!("img-{label}");
        import_tree(&s, &image, &tree);

        let mut samples = Vec::new();
        c.bench_function(&format!("storage/create_delete/{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    s.create_volume("bench-phone", &image, 2 << 30)
                        .expect("create");
                    s.delete_volume("bench-phone").expect("delete");
                    let d = t.elapsed();
                    samples.push(d);
                    total += d;
                }
                total
            })
        });
        s.create_volume("bench-reset", &image, 2 << 30)
            .expect("create");
        let mut resets = Vec::new();
        c.bench_function(&format!("storage/reset/{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    s.reset_volume("bench-reset", None).expect("reset");
                    let d = t.elapsed();
                    resets.push(d);
                    total += d;
                }
                total
            })
        });
        // An image update: the volume moves between two images of the
        // same tree keeping its first directory (as a phone keeps /data).
        let other = format!("img-{label}-b");
        import_tree(&s, &other, &tree);
        let mut updates = Vec::new();
        let mut on_other = false;
        c.bench_function(&format!("storage/update/{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let to = if on_other { &image } else { &other };
                    let t = Instant::now();
                    s.upgrade_volume("bench-reset", to, &["d0"])
                        .expect("update");
                    let d = t.elapsed();
                    on_other = !on_other;
                    updates.push(d);
                    total += d;
                }
                total
            })
        });
        s.delete_volume("bench-reset").expect("delete");
        s.delete_image(&other).expect("delete image");
        let mut copies = Vec::new();
        let copy = tmp.path().join("copy");
        c.bench_function(&format!("storage/cp_a/{label}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = std::fs::remove_dir_all(&copy);
                    let t = Instant::now();
                    let ok = Command::new("cp")
                        .arg("-a")
                        .arg(&tree)
                        .arg(&copy)
                        .status()
                        .expect("cp")
                        .success();
                    assert!(ok, "cp -a failed");
                    let d = t.elapsed();
                    copies.push(d);
                    total += d;
                }
                total
            })
        });
        let _ = std::fs::remove_dir_all(&copy);
        let _ = std::fs::remove_dir_all(&tree);
        s.delete_image(&image).expect("delete image");
        let (ours, reset, update, anchor) =
            (mean(&samples), mean(&resets), mean(&updates), mean(&copies));
        create_ms.push(ours);
        metrics.push(Metric {
            metric: format!("volume create+delete, {label} image (anchor: cp -a)"),
            ours,
            anchor,
            unit: "ms",
        });
        metrics.push(Metric {
            metric: format!("volume reset, {label} image (anchor: cp -a)"),
            ours: reset,
            anchor,
            unit: "ms",
        });
        metrics.push(Metric {
            metric: format!(
                "volume image update keeping a directory, {label} image (anchor: cp -a)"
            ),
            ours: update,
            anchor,
            unit: "ms",
        });
    }
    metrics.push(Metric {
        metric: format!(
            "create+delete of the {} image against the {} image (target <= 2)",
            sizes[1].0, sizes[0].0
        ),
        ours: create_ms[1],
        anchor: create_ms[0],
        unit: "ms",
    });
    if full {
        report::write("storage", &metrics);
    }
}
