//! Placement quality and speed: for each fixture host the plan's figures
//! (phones per core, NUMA-local share, GPU imbalance) and the plan time,
//! then 150 phones on 128 cores and a simulated 10,000-CPU host. There is no
//! outside tool to compare with, so the anchors are the targets: plan time
//! 1 ms on real hosts and 50 ms at 10,000 CPUs, NUMA-local 100%, at most R
//! phones per CPU, GPU imbalance 1. Writes `target/bench-report/placement.json`.

use std::path::Path;
use std::time::{Duration, Instant};

use cph_runtime::placement::synth::HostShape;
use cph_runtime::placement::{figures, plan, PlanRequest, Topology};
use criterion::Criterion;

#[path = "common/report.rs"]
mod report;
use report::Metric;

fn request(strategy: &str, capacity: u32) -> PlanRequest {
    PlanRequest {
        strategy: strategy.to_string(),
        capacity,
        vcpus: 2,
        memory_mb: 0,
        reserved: None,
    }
}

/// Median wall time of `plan` over a few runs, outside criterion's loop, for the report.
fn median_plan_time(topo: &Topology, req: &PlanRequest) -> Duration {
    let mut t: Vec<Duration> = (0..15)
        .map(|_| {
            let start = Instant::now();
            let p = plan(topo, req).expect("plan");
            std::hint::black_box(p);
            start.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_millis(600))
        .warm_up_time(Duration::from_millis(200))
        .configure_from_args();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("runtime/tests/fixtures/sysfs");
    let cases = [
        ("vm-2cpu", "dev_small", 2u32, 1.0),
        ("hi1616-rx1-xlarge", "common_hosted_c60", 60, 1.0),
        ("kunpeng920-kg1-4xlarge", "common_hosted_c150", 150, 1.0),
        ("kunpeng920-kg1-4xlarge-gpu", "common_hosted_c150", 150, 1.0),
        ("kunpeng920-kg1-4xlarge-gpu", "exclusive_c60", 60, 1.0),
    ];
    let mut metrics = Vec::new();
    for (fixture, strategy, capacity, target_ms) in cases {
        let topo = Topology::discover(&fixtures.join(fixture)).expect("fixture");
        let req = request(strategy, capacity);
        let p = plan(&topo, &req).expect("plan");
        let f = figures(&topo, &p);
        let name = format!("{fixture}/{strategy}");
        c.bench_function(&format!("plan/{name}"), |b| {
            b.iter(|| plan(&topo, &req).expect("plan"))
        });
        let t = median_plan_time(&topo, &req);
        println!(
            "{name}: max phones/cpu {} numa-local {:.0}% cluster-local {:.0}% gpu imbalance {} \
             gpu-local {:.0}% plan {:.1} us",
            f.max_phones_per_cpu,
            f.numa_local_share * 100.0,
            f.cluster_local_share * 100.0,
            f.gpu_imbalance,
            f.gpu_local_share * 100.0,
            t.as_secs_f64() * 1e6
        );
        metrics.push(Metric {
            metric: format!("{name} plan time"),
            ours: t.as_secs_f64() * 1e3,
            anchor: target_ms,
            unit: "ms",
        });
        metrics.push(Metric {
            metric: format!("{name} numa-local share"),
            ours: f.numa_local_share,
            anchor: 1.0,
            unit: "share",
        });
        metrics.push(Metric {
            metric: format!("{name} max phones per cpu"),
            ours: f64::from(f.max_phones_per_cpu),
            anchor: f64::from(p.ratio),
            unit: "phones",
        });
        if !topo.gpus.is_empty() {
            metrics.push(Metric {
                metric: format!("{name} gpu imbalance"),
                ours: f.gpu_imbalance as f64,
                anchor: 1.0,
                unit: "phones",
            });
        }
    }

    // A simulated large host: 40 nodes x 250 cores, 4-core clusters, 8 GPUs.
    let big = HostShape {
        packages: 10,
        nodes_per_package: 4,
        cores_per_node: 250,
        threads_per_core: 1,
        cluster_cores: 4,
        memory_mb_per_node: 256 * 1024,
        gpu_nodes: (0..8).map(|i| Some(i * 5)).collect(),
    }
    .topology();
    let capacity = u32::try_from(big.cpus.len() - 40).expect("fits");
    let req = request(&format!("common_hosted_c{capacity}"), capacity);
    c.bench_function("plan/10000-cpus", |b| {
        b.iter(|| plan(&big, &req).expect("plan"))
    });
    let t = median_plan_time(&big, &req);
    println!(
        "10000 cpus, {capacity} phones: plan {:.2} ms",
        t.as_secs_f64() * 1e3
    );
    metrics.push(Metric {
        metric: format!("10000 cpus {capacity} phones plan time"),
        ours: t.as_secs_f64() * 1e3,
        anchor: 50.0,
        unit: "ms",
    });
    report::write("placement", &metrics);
    c.final_summary();
}
