//! `GET /metrics`: the host and its phones in the Prometheus text format,
//! behind the node token like the rest of the agent protocol (a scraper
//! sends it as a bearer token). Per phone: CPU time, memory and processes
//! from its cgroup, bytes received and sent from its veth.

use super::Daemon;
use crate::metrics::{labels, render_families};
use crate::protocol::PhoneRunState;

fn state_name(s: PhoneRunState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The agent's metrics now.
pub fn render(d: &Daemon) -> String {
    let usage = d.phones.usage();
    let mut by_state = std::collections::BTreeMap::<String, f64>::new();
    let (mut cpu, mut mem, mut procs, mut rx, mut tx) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for super::phones::PhoneUsage {
        state: st,
        usage: u,
        traffic,
    } in &usage
    {
        *by_state.entry(state_name(st.state)).or_default() += 1.0;
        let l = labels(&[("phone_id", &st.phone_id), ("server_id", &st.server_id)]);
        cpu.push((l.clone(), u.cpu_ns as f64 / 1e9));
        mem.push((l.clone(), u.memory_bytes as f64));
        procs.push((l.clone(), u.processes as f64));
        if let Some((received, sent)) = traffic {
            rx.push((l.clone(), *received as f64));
            tx.push((l, *sent as f64));
        }
    }
    let states = by_state
        .into_iter()
        .map(|(s, n)| (labels(&[("state", &s)]), n))
        .collect();
    render_families(&[
        (
            "cph_agent_phone_capacity",
            "Phones this host holds.",
            "gauge",
            vec![(String::new(), f64::from(d.cfg.phone_capacity))],
        ),
        (
            "cph_agent_phones",
            "Phones on this host by state.",
            "gauge",
            states,
        ),
        (
            "cph_agent_jobs_running",
            "Jobs running on this host now.",
            "gauge",
            vec![(String::new(), d.running_jobs() as f64)],
        ),
        (
            "cph_phone_cpu_seconds_total",
            "CPU time of the phone's processes since it started.",
            "counter",
            cpu,
        ),
        (
            "cph_phone_memory_bytes",
            "Memory the phone uses, page cache included.",
            "gauge",
            mem,
        ),
        (
            "cph_phone_processes",
            "Processes in the phone.",
            "gauge",
            procs,
        ),
        (
            "cph_phone_network_receive_bytes_total",
            "Bytes the phone received on its network.",
            "counter",
            rx,
        ),
        (
            "cph_phone_network_transmit_bytes_total",
            "Bytes the phone sent on its network.",
            "counter",
            tx,
        ),
    ])
}
