//! Object-store hot paths against the embedded S3 server on loopback:
//! (1) a tar extracted with `cph_runtime::archive::extract` while it streams
//! from the store, next to the same tar extracted from a local file (the
//! target: streamed within 15% of local); (2) multipart upload throughput
//! through the streaming writer, next to writing the same bytes to a local
//! file. Writes `target/bench-report/objstore.json` under `cargo bench`;
//! under `cargo test --all-targets` it is a smoke run on small objects.

use std::cell::RefCell;
use std::io::Write;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use cph_agent::objstore::{serve, ObjectStore};
use cph_runtime::archive::{extract, write_tar, ExtractOptions};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

const BUCKET: &str = "bench";
const MIB: usize = 1 << 20;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A tree of `small` 4 KiB files and `large` files of `large_mib` MiB, as tar bytes.
fn make_tar(dir: &Path, small: usize, large: usize, large_mib: usize) -> Vec<u8> {
    let src = dir.join("src");
    for d in 0..(small / 100 + 1) {
        std::fs::create_dir_all(src.join(format!("data/d{d}"))).expect("mkdir");
    }
    for i in 0..small {
        let p = src.join(format!("data/d{}/f{i}", i / 100));
        std::fs::write(p, pattern(4096, i as u64)).expect("write small");
    }
    for i in 0..large {
        let p = src.join(format!("data/large{i}.bin"));
        std::fs::write(p, pattern(large_mib * MIB, 1000 + i as u64)).expect("write large");
    }
    let mut tar = Vec::new();
    write_tar(&src, &[], &[], &mut tar).expect("write tar");
    std::fs::remove_dir_all(&src).expect("remove source tree");
    tar
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // As the agent process does.
    cph_agent::memory::keep_transfer_buffers();
    let full = std::env::args().any(|a| a == "--bench");
    let (small, large, large_mib, upload_mib) = if full {
        (5_000, 4, 32, 256)
    } else {
        (50, 1, 2, 9)
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(3));
    if full {
        c = c.configure_from_args();
    } else {
        c = c
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(200));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = rt
        .block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            serve(
                dir.path().join("store"),
                listener,
                "bench-ak".into(),
                "bench-sk".into(),
            )
            .await
            .map_err(std::io::Error::other)
        })
        .expect("embedded store");
    let store = ObjectStore::new(&server.client_config()).expect("client");
    rt.block_on(store.create_bucket(BUCKET)).expect("bucket");

    let tar = make_tar(dir.path(), small, large, large_mib);
    let tar_len = tar.len() as u64;
    let local = dir.path().join("local.tar");
    std::fs::write(&local, &tar).expect("local tar");
    rt.block_on(store.put_bytes(BUCKET, "push.tar", tar))
        .expect("put tar");
    let opts = ExtractOptions {
        sync: true,
        ..ExtractOptions::default()
    };
    let targets = dir.path().join("targets");
    std::fs::create_dir(&targets).expect("targets");
    let fresh = {
        let targets = targets.clone();
        let mut n = 0u64;
        move || {
            n += 1;
            let t = targets.join(format!("t{n}"));
            std::fs::create_dir(&t).expect("target");
            t
        }
    };
    let fresh = Rc::new(RefCell::new(fresh));

    let local_times = Rc::new(RefCell::new(Vec::new()));
    let streamed_times = Rc::new(RefCell::new(Vec::new()));
    let mut g = c.benchmark_group("objstore_extract");
    g.throughput(criterion::Throughput::Bytes(tar_len));
    g.bench_function("local_file", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let target = (fresh.borrow_mut())();
                let start = Instant::now();
                let file = std::fs::File::open(&local).expect("open tar");
                extract(std::io::BufReader::with_capacity(MIB, file), &target, &opts)
                    .expect("extract local");
                let d = start.elapsed();
                total += d;
                local_times.borrow_mut().push(d);
                std::fs::remove_dir_all(&target).expect("clean target");
            }
            total
        })
    });
    g.bench_function("streamed_from_store", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let target = (fresh.borrow_mut())();
                let (t, o) = (target.clone(), opts.clone());
                let start = Instant::now();
                rt.block_on(
                    store.download_with(BUCKET, "push.tar", u64::MAX, move |r| extract(r, &t, &o)),
                )
                .expect("download")
                .expect("extract streamed");
                let d = start.elapsed();
                total += d;
                streamed_times.borrow_mut().push(d);
                std::fs::remove_dir_all(&target).expect("clean target");
            }
            total
        })
    });
    g.finish();

    let payload = std::sync::Arc::new(pattern(upload_mib * MIB, 7));
    let upload_times = Rc::new(RefCell::new(Vec::new()));
    let file_times = Rc::new(RefCell::new(Vec::new()));
    let mut g = c.benchmark_group("objstore_upload");
    g.throughput(criterion::Throughput::Bytes(payload.len() as u64));
    g.bench_function("multipart_writer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let data = payload.clone();
                let start = Instant::now();
                rt.block_on(store.upload_with(BUCKET, "export.tar", move |w| {
                    for chunk in data.chunks(256 * 1024) {
                        w.write_all(chunk)?;
                    }
                    Ok(())
                }))
                .expect("upload");
                let d = start.elapsed();
                total += d;
                upload_times.borrow_mut().push(d);
            }
            total
        })
    });
    g.bench_function("local_file_write", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let path = dir.path().join("export-local.tar");
                let start = Instant::now();
                let mut f = std::fs::File::create(&path).expect("create");
                for chunk in payload.chunks(256 * 1024) {
                    f.write_all(chunk).expect("write");
                }
                f.sync_all().expect("sync");
                let d = start.elapsed();
                total += d;
                file_times.borrow_mut().push(d);
            }
            total
        })
    });
    g.finish();
    c.final_summary();

    let streamed = median(&mut streamed_times.borrow_mut());
    let local_d = median(&mut local_times.borrow_mut());
    let mbps = |bytes: u64, d: Duration| bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9);
    let up = median(&mut upload_times.borrow_mut());
    let file = median(&mut file_times.borrow_mut());
    let metrics = vec![
        Metric {
            metric: "extract_streamed_vs_local_time".into(),
            ours: streamed.as_secs_f64() * 1e3,
            anchor: local_d.as_secs_f64() * 1e3,
            unit: "ms",
        },
        Metric {
            metric: "upload_multipart_vs_local_file_write".into(),
            ours: mbps(payload.len() as u64, up),
            anchor: mbps(payload.len() as u64, file),
            unit: "MB/s",
        },
    ];
    rt.block_on(server.shutdown()).expect("shutdown");
    if !full {
        eprintln!(
            "objstore smoke run done: streamed {streamed:?} local {local_d:?}, upload {up:?} file {file:?}; no report written"
        );
        return;
    }
    report::write("objstore", &metrics);
}
