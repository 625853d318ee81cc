//! The real `cph-agent run` binary over a temporary state dir, driving real
//! phone containers of the test image through the agent protocol: token
//! refusal, server creation, sync and async shell, property update,
//! idempotent job ids, a kill mid-job and restart (the job ends failed, the
//! phone keeps running), server deletion. Guards kill the agent and delete
//! every container, volume mount and network object of the test whatever
//! happens.

use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{
    delete_server, http, http_text, image, job, run_job, server_job, wait_job, TestAgent,
};

#[test]
fn agent_runs_phones_and_jobs_through_the_protocol() {
    if !cph_runtime::privilege::check("agent_runs_phones_and_jobs_through_the_protocol") {
        return;
    }
    let mut t = TestAgent::start("agentd", true, "");
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());

    // A wrong or missing token is refused.
    assert_eq!(http(&addr, "GET", "/v1/phones", "wrong", None).0, 401);
    // The inventory: the host's topology as placement reads it, and its
    // pools measured.
    let (code, inv) = http(&addr, "GET", "/v1/inventory", &token, None);
    assert_eq!(code, 200, "{inv}");
    let topo =
        cph_runtime::placement::Topology::discover(std::path::Path::new("/sys")).expect("topology");
    assert_eq!(
        (
            inv["cpus"].as_u64(),
            inv["numa_nodes"].as_u64(),
            inv["gpus"].as_u64()
        ),
        (
            Some(topo.cpus.len() as u64),
            Some(topo.nodes.len() as u64),
            Some(topo.gpus.len() as u64)
        ),
        "{inv}"
    );
    let pools = inv["pools"].as_array().expect("pools");
    let names: Vec<&str> = pools.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(names, ["thinpool", "sharepool"], "{inv}");
    for p in pools {
        let (size, used, avail) = (
            p["size_bytes"].as_u64().expect("size"),
            p["used_bytes"].as_u64().expect("used"),
            p["avail_bytes"].as_u64().expect("avail"),
        );
        assert!(size > 0 && used <= size && avail <= size, "{p}");
        assert_eq!(p["backend"], "overlay", "{p}");
    }

    let server = format!("s{pid}");
    let phone = format!("p{pid}");
    let create = json!({
        "server_id": server, "server_name": "test",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                    "core_bind_strategy": "dev_small", "extend_spec": {"max_share_disk_size_g": 2}},
        "image": {"image_id": "img", "url": format!("file://{}", image().display())},
        "ports": [], "band_width_size": 10, "public_key": "ssh-ed25519 AAAA0 zero@cph",
        "phones": [{"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    // A phone id that would not name its container as it is: refused,
    // nothing taken (not even the server's key).
    let mut odd = create.clone();
    odd["phones"][0]["phone_id"] = json!(format!("p.{pid}"));
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&odd));
    assert_eq!(
        (code, &body["error_code"]),
        (400, &json!("CPS.0004")),
        "{body}"
    );
    assert!(
        !std::fs::read_to_string(t.state.join("ssh/authorized_keys"))
            .unwrap_or_default()
            .contains("zero@cph")
    );
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    // The bought server's key opens the host's SSH access at once.
    assert_eq!(
        std::fs::read_to_string(t.state.join("ssh/authorized_keys")).expect("authorized_keys"),
        "ssh-ed25519 AAAA0 zero@cph\n"
    );
    let created = wait_job(&addr, &token, &format!("{server}:create:{phone}"));
    assert_eq!(created["status"], 2, "{created}");
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "{phones}");

    // Metrics: the phone's CPU time, memory and processes from its cgroup,
    // its traffic from its veth; behind the node token.
    assert_eq!(http_text(&addr, "GET", "/metrics", "wrong", None).0, 401);
    let (code, text) = http_text(&addr, "GET", "/metrics", &token, None);
    assert_eq!(code, 200, "{text}");
    let sample = |name: &str| -> f64 {
        let prefix = format!("{name}{{phone_id=\"{phone}\",server_id=\"{server}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} of {phone} in {text}"))
    };
    assert!(sample("cph_phone_cpu_seconds_total") > 0.0, "{text}");
    assert!(sample("cph_phone_memory_bytes") > 0.0, "{text}");
    assert!(sample("cph_phone_processes") >= 1.0, "{text}");
    assert!(
        sample("cph_phone_network_transmit_bytes_total") >= 0.0,
        "{text}"
    );
    assert!(
        sample("cph_phone_network_receive_bytes_total") >= 0.0,
        "{text}"
    );
    assert!(
        text.contains("cph_agent_phones{state=\"running\"} 1\n")
            && text.contains("# TYPE cph_phone_cpu_seconds_total counter\n"),
        "{text}"
    );

    // Sync shell answers in the response.
    let (code, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sync-1",
            &server,
            &phone,
            json!({"kind": "sync_shell", "command": "echo hi", "timeout_ms": 2000}),
        )),
    );
    assert_eq!(code, 200);
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(st["execute_msg"], "hi\n");
    // The same id again returns the recorded status; the new command never runs.
    let (_, again) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sync-1",
            &server,
            &phone,
            json!({"kind": "sync_shell", "command": "echo other", "timeout_ms": 2000}),
        )),
    );
    assert_eq!(again["execute_msg"], "hi\n");

    // Async shell.
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sh-1",
            &server,
            &phone,
            json!({"kind": "shell", "command": "getprop ro.product.model"}),
        )),
    );
    let st = wait_job(&addr, &token, "sh-1");
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(st["execute_msg"].as_str().map(str::trim), Some("cph-test"));

    // A batch: recorded together, answered in order, run in arrival order
    // per phone; a repeated, an invalid and an already known id each get
    // their own answer.
    let batch = json!({"jobs": [
        job("b-1", &server, &phone, json!({"kind": "shell", "command": "echo one > /data/b"})),
        job("b-2", &server, &phone, json!({"kind": "shell", "command": "cat /data/b"})),
        job("b-1", &server, &phone, json!({"kind": "shell", "command": "echo two > /data/b"})),
        job("bad id!", &server, &phone, json!({"kind": "shell", "command": "true"})),
        job("sh-1", &server, &phone, json!({"kind": "shell", "command": "true"})),
    ]});
    let (code, answers) = http(&addr, "POST", "/v1/jobs/batch", &token, Some(&batch));
    assert_eq!(code, 200, "{answers}");
    let ids: Vec<&str> = answers
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a["job_id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(ids, ["b-1", "b-2", "b-1", "bad id!", "sh-1"], "{answers}");
    assert_eq!(answers[0]["status"]["status"], 1, "{answers}");
    assert_eq!(answers[2]["status"]["status"], 1, "{answers}");
    assert_eq!(answers[3]["error_code"], "CPS.0048", "{answers}");
    assert!(answers[3]["status"].is_null(), "{answers}");
    assert_eq!(answers[4]["status"]["status"], 2, "{answers}");
    let st = wait_job(&addr, &token, "b-2");
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        st["execute_msg"].as_str().map(str::trim),
        Some("one"),
        "{st}"
    );

    // Property: a live one is set in the phone at once; an unknown one is refused.
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "prop-1",
            &server,
            &phone,
            json!({"kind": "update_property", "property": {"com.cph.mainkeys": "1"}}),
        )),
    );
    assert_eq!(wait_job(&addr, &token, "prop-1")["status"], 2);
    let (_, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sync-2",
            &server,
            &phone,
            json!({"kind": "sync_shell", "command": "getprop com.cph.mainkeys", "timeout_ms": 2000}),
        )),
    );
    assert_eq!(st["execute_msg"].as_str().map(str::trim), Some("1"), "{st}");
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "prop-2",
            &server,
            &phone,
            json!({"kind": "update_property", "property": {"no.such": "1"}}),
        )),
    );
    let st = wait_job(&addr, &token, "prop-2");
    assert_eq!(st["status"], -1);
    assert_eq!(st["error_code"], "CPS.0163");

    // A read-only property waits for the next start, where it is an init
    // argument; it and the live ones hold over every later boot.
    let run = |id: &str, kind: Value| {
        http(
            &addr,
            "POST",
            "/v1/jobs",
            &token,
            Some(&job(id, &server, &phone, kind)),
        );
        wait_job(&addr, &token, id)
    };
    let getprop = |id: &str, name: &str| {
        let cmd = format!("getprop {name}");
        let st = run(
            id,
            json!({"kind": "sync_shell", "command": cmd, "timeout_ms": 2000}),
        );
        st["execute_msg"]
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let st = run(
        "prop-3",
        json!({"kind": "update_property", "property": {"ro.install.auto": "1"}}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(st["execute_msg"], "applied at next start: ro.install.auto");
    assert_eq!(getprop("sync-ro-1", "ro.install.auto"), "");
    for boot in ["restart-1", "restart-2"] {
        let st = run(
            boot,
            json!({"kind": "restart_phone", "image": null, "property": null}),
        );
        assert_eq!(st["status"], 2, "{boot}: {st}");
        assert_eq!(getprop(&format!("{boot}-ro"), "ro.install.auto"), "1");
        assert_eq!(getprop(&format!("{boot}-live"), "com.cph.mainkeys"), "1");
    }
    let st = run(
        "prop-4",
        json!({"kind": "update_property", "property": {"sys.prop.write_imsi": "46000x"}}),
    );
    assert_eq!(st["error_code"], "CPS.0075", "{st}");

    // A persistent property (the language) is set once: the user's own
    // choice inside the phone then holds over a restart; one given while
    // the phone is stopped is set at its next start.
    let sh = |id: &str, cmd: &str| {
        let st = run(
            id,
            json!({"kind": "sync_shell", "command": cmd, "timeout_ms": 2000}),
        );
        assert_eq!(st["status"], 2, "{id}: {st}");
    };
    let st = run(
        "locale-1",
        json!({"kind": "update_property", "property": {"persist.sys.locale": "en-US"}}),
    );
    assert_eq!(st["execute_msg"], "applied", "{st}");
    assert_eq!(getprop("locale-get-1", "persist.sys.locale"), "en-US");
    sh("locale-user", "setprop persist.sys.locale fr-FR");
    let st = run(
        "locale-restart",
        json!({"kind": "restart_phone", "image": null, "property": null}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(getprop("locale-get-2", "persist.sys.locale"), "fr-FR");
    assert_eq!(
        run("locale-stop", json!({"kind": "stop_phone"}))["status"],
        2
    );
    let st = run(
        "locale-2",
        json!({"kind": "update_property", "property": {"persist.sys.locale": "de-DE"}}),
    );
    assert_eq!(
        st["execute_msg"], "applied at next start: persist.sys.locale",
        "{st}"
    );
    assert_eq!(
        run("locale-start", json!({"kind": "start_phone"}))["status"],
        2
    );
    assert_eq!(getprop("locale-get-3", "persist.sys.locale"), "de-DE");

    // A property the phone cannot take fails the job and is not recorded:
    // the next start does not bring it in.
    sh(
        "break-props",
        "rm -rf /data/property.keep && mv /data/property /data/property.keep && : > /data/property",
    );
    let st = run(
        "prop-5",
        json!({"kind": "update_property", "property": {"disable.status.bar": "1"}}),
    );
    assert_eq!(st["status"], -1, "{st}");
    sh(
        "mend-props",
        "rm /data/property && mv /data/property.keep /data/property",
    );
    let st = run(
        "restart-3",
        json!({"kind": "restart_phone", "image": null, "property": null}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(getprop("prop-5-get", "disable.status.bar"), "");
    assert_eq!(getprop("prop-5-live", "com.cph.mainkeys"), "1");

    // A sync shell over its 2 s limit fails instead of waiting.
    let (_, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sync-3",
            &server,
            &phone,
            json!({"kind": "sync_shell", "command": "sleep 10", "timeout_ms": 60000}),
        )),
    );
    assert_eq!(st["status"], -1, "{st}");

    // Kill the agent in the middle of a long job: after restart the job is
    // failed, never running, and the phone still runs.
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "long-1",
            &server,
            &phone,
            json!({"kind": "shell", "command": "sleep 30"}),
        )),
    );
    std::thread::sleep(Duration::from_millis(500));
    t.agent.restart();
    let st = wait_job(&addr, &token, "long-1");
    assert_eq!(st["status"], -1, "{st}");
    // Batched jobs were recorded like single ones.
    assert_eq!(
        wait_job(&addr, &token, "b-2")["execute_msg"]
            .as_str()
            .map(str::trim),
        Some("one")
    );
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "{phones}");

    // Killed while a restart waits for a phone that does not stop at once
    // (its init held with SIGSTOP, so the stop waits out its grace): the
    // phone ran before the job, so the agent starts it again at its own
    // next start rather than leaving it stopped for good.
    let read_json = |path: std::path::PathBuf| -> Value {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("json")
    };
    let container = t.state.join(format!("containers/cph-{phone}/state.json"));
    let init_pid = read_json(container)["pid"].as_i64().expect("init pid");
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &init_pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill {sig} {init_pid}");
    };
    let within = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // A migration's unpacking a kill cut off, inside the phone's root.
    let st = run(
        "leftover",
        json!({"kind": "sync_shell", "command": "mkdir -p /.cph-migrate-in/data && echo x > /.cph-migrate-in/data/f", "timeout_ms": 2000}),
    );
    assert_eq!(st["status"], 2, "{st}");
    signal("-STOP");
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "restart-held",
            &server,
            &phone,
            json!({"kind": "restart_phone", "image": null, "property": null}),
        )),
    );
    let record = t.state.join(format!("phones/cph-{phone}.json"));
    within("the restart stops the phone", &|| {
        read_json(record.clone())["stopped"] == json!(true)
    });
    // The record is written before the TERM is sent: wait for the signal
    // itself, pending on the stopped init, before the kill.
    within("the restart's TERM is pending", &|| {
        let status =
            std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap_or_default();
        status.lines().any(|l| {
            let pending = l
                .strip_prefix("ShdPnd:")
                .or_else(|| l.strip_prefix("SigPnd:"));
            pending
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (15 - 1)) != 0)
        })
    });
    t.agent.kill();
    // A key left by a server deletion a kill cut off.
    let keys = t.state.join("ssh/authorized_keys");
    let mut text = std::fs::read_to_string(&keys).expect("authorized_keys");
    text.push_str("ssh-ed25519 AAAAstale stale@cph\n");
    std::fs::write(&keys, text).expect("write authorized_keys");
    // The pending TERM ends init once it runs again.
    signal("-CONT");
    within("the phone's init exits", &|| {
        !std::path::Path::new(&format!("/proc/{init_pid}")).exists()
    });
    t.agent.restart();
    assert_eq!(wait_job(&addr, &token, "restart-held")["status"], -1);
    let text = std::fs::read_to_string(&keys).expect("authorized_keys");
    assert!(!text.contains("stale@cph"), "{text}");
    assert!(text.contains("zero@cph"), "{text}");
    within("the phone runs again", &|| {
        let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
        phones[0]["state"] == "running"
    });
    assert_eq!(
        output(&run(
            "leftover-gone",
            json!({"kind": "sync_shell",
            "command": "test -e /.cph-migrate-in && echo left || echo gone", "timeout_ms": 2000})
        )),
        "gone"
    );

    // A restore's swap caught half way (new entries partly moved in) is
    // finished before the phone boots again.
    let st = run(
        "half-moved",
        json!({"kind": "sync_shell",
               "command": "mkdir -p /.cph-migrate-in/migrated && echo in > /.cph-migrate-in/migrated/f && : > /.cph-migrate-in.moving",
               "timeout_ms": 2000}),
    );
    assert_eq!(st["status"], 2, "{st}");
    let st = run(
        "restart-settles",
        json!({"kind": "restart_phone", "image": null, "property": null}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        output(&run(
            "settled",
            json!({"kind": "sync_shell",
                   "command": "cat /migrated/f; ls -a / | grep -c cph-migrate; true", "timeout_ms": 2000})
        )),
        "in\n0"
    );

    let (_, st) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "sync-4",
            &server,
            &phone,
            json!({"kind": "sync_shell", "command": "echo still", "timeout_ms": 2000}),
        )),
    );
    assert_eq!(st["execute_msg"], "still\n", "{st}");

    // A server restart waits for the job its phone runs (a shell that
    // would die with the phone), then restarts the phone; a stopped phone
    // is started by it.
    let init_pid = |path: std::path::PathBuf| read_json(path)["pid"].as_i64();
    let state_file = t.state.join(format!("containers/cph-{phone}/state.json"));
    let before = init_pid(state_file.clone()).expect("init pid");
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "held-shell",
            &server,
            &phone,
            json!({"kind": "shell", "command": "sleep 2; echo survived"}),
        )),
    );
    std::thread::sleep(Duration::from_millis(300));
    let st = run_job(
        &addr,
        &token,
        &server_job(
            "restart-server-1",
            &server,
            json!({"kind": "restart_server"}),
        ),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        st["execute_msg"],
        json!(format!("server {server}: 1 phones restarted")),
        "{st}"
    );
    let shell = wait_job(&addr, &token, "held-shell");
    assert_eq!(
        (shell["status"].clone(), output(&shell)),
        (json!(2), "survived".to_string()),
        "{shell}"
    );
    let after = init_pid(state_file.clone()).expect("init pid");
    assert_ne!(before, after, "the phone was restarted");
    let st = run("stop-for-server", json!({"kind": "stop_phone"}));
    assert_eq!(st["status"], 2, "{st}");
    let st = run_job(
        &addr,
        &token,
        &server_job(
            "restart-server-2",
            &server,
            json!({"kind": "restart_server"}),
        ),
    );
    assert_eq!(st["status"], 2, "{st}");
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "{phones}");

    // A property update that fails half-way sets back what it had set:
    // the locale cannot be written (a directory where setprop writes), so
    // the main keys, set before it, get their former value again.
    let sync =
        |command: &str| json!({"kind": "sync_shell", "command": command, "timeout_ms": 2000});
    let st = run(
        "props-block",
        sync("mkdir -p /data/property/persist.sys.locale.tmp"),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(getprop("props-before", "com.cph.mainkeys"), "1");
    let st = run(
        "props-half",
        json!({"kind": "update_property",
               "property": {"com.cph.mainkeys": "0", "persist.sys.locale": "fr-FR"}}),
    );
    assert_eq!(st["status"], -1, "{st}");
    assert_eq!(
        getprop("props-after", "com.cph.mainkeys"),
        "1",
        "set back after the failure"
    );
    let st = run(
        "props-unblock",
        sync("rmdir /data/property/persist.sys.locale.tmp"),
    );
    assert_eq!(st["status"], 2, "{st}");

    // Arrival order holds between a server's job and its phones' own: a
    // shell, a stop, then a server restart behind them: the restart comes
    // last (the phone ends running), not as soon as the shell ended.
    for (id, kind) in [
        (
            "order-shell",
            json!({"kind": "shell", "command": "sleep 1"}),
        ),
        ("order-stop", json!({"kind": "stop_phone"})),
    ] {
        http(
            &addr,
            "POST",
            "/v1/jobs",
            &token,
            Some(&job(id, &server, &phone, kind)),
        );
    }
    http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&server_job(
            "order-restart",
            &server,
            json!({"kind": "restart_server"}),
        )),
    );
    for id in ["order-shell", "order-stop", "order-restart"] {
        assert_eq!(wait_job(&addr, &token, id)["status"], 2, "{id}");
    }
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "restart ran last: {phones}");

    // A restart that cannot start the phone again (its init gone) leaves
    // it reading "restart failed" (the API's -6), not "creation failed".
    let init = t.state.join(format!("pool/volumes/{phone}/rootfs/init"));
    let moved = init.with_file_name("init.off");
    std::fs::rename(&init, &moved).expect("hide init");
    let st = run(
        "restart-fails",
        json!({"kind": "restart_phone", "image": null, "property": null}),
    );
    assert_eq!(st["status"], -1, "{st}");
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "restart_failed", "{phones}");
    std::fs::rename(&moved, &init).expect("init back");
    let st = run("start-again", json!({"kind": "start_phone"}));
    assert_eq!(st["status"], 2, "{st}");
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "{phones}");

    // A create sent again for a phone whose last step failed (a restart's
    // failure, recorded by hand while the agent is down) starts it and
    // keeps its data; it never makes the volume anew.
    let st = run(
        "keep-me",
        json!({"kind": "sync_shell", "command": "echo kept > /data/local/keep-me", "timeout_ms": 2000}),
    );
    assert_eq!(st["status"], 2, "{st}");
    t.agent.kill();
    let record = t.state.join(format!("phones/cph-{phone}.json"));
    let mut rec = read_json(record.clone());
    rec["failure"] = json!("restart failed");
    std::fs::write(&record, rec.to_string()).expect("write record");
    // What jobs a kill cut off left: an installation's APKs, a share app's
    // version not swapped in. Gone at the next start; a shared app stays.
    let apk_left = t.state.join("staging/install-cut/0.apk");
    let apps = t.state.join("pool/share/apps");
    let share_left = apps.join(".com.example.cut.new");
    std::fs::create_dir_all(apk_left.parent().expect("dir")).expect("staging");
    std::fs::write(&apk_left, b"apk").expect("apk");
    std::fs::create_dir_all(share_left.join("lib")).expect("share staging");
    std::fs::create_dir_all(apps.join("com.example.kept")).expect("shared app");
    t.agent.restart();
    assert!(!apk_left.exists() && !share_left.exists());
    assert!(apps.join("com.example.kept").is_dir());
    std::fs::remove_dir(apps.join("com.example.kept")).expect("remove");
    let st = run(
        "create-again",
        json!({"kind": "create_phone",
               "phone": {"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}}),
    );
    assert_eq!(st["status"], 2, "{st}");
    // Read from the volume after a restart (a running phone could still
    // see a dropped volume's files).
    let st = run(
        "restart-after-create",
        json!({"kind": "restart_phone", "image": null, "property": null}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        output(&run(
            "kept",
            json!({"kind": "sync_shell", "command": "cat /data/local/keep-me", "timeout_ms": 2000})
        )),
        "kept"
    );

    // A server keypair change replaces the server's earlier key in the
    // host's authorized_keys.
    let keys = t.state.join("ssh/authorized_keys");
    for (id, key) in [
        ("key-1", "ssh-ed25519 AAAA1 one@cph"),
        ("key-2", "ssh-ed25519 AAAA2 two@cph"),
    ] {
        let st = run_job(
            &addr,
            &token,
            &server_job(
                id,
                &server,
                json!({"kind": "update_keypair", "public_key": key}),
            ),
        );
        assert_eq!(st["status"], 2, "{st}");
    }
    assert_eq!(
        std::fs::read_to_string(&keys).expect("authorized_keys"),
        "ssh-ed25519 AAAA2 two@cph\n"
    );

    // Deleting the server releases the host: its phone, its placement, its
    // key, and what its sharepool held are gone.
    let share = t.state.join("pool/share");
    std::fs::write(share.join("files/left.txt"), "tenant data").expect("share file");
    std::fs::create_dir_all(share.join("apps/com.example.left")).expect("share app");
    let placements = || {
        std::fs::read_dir(&t.state)
            .expect("state dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("placement-"))
            .count()
    };
    assert_eq!(placements(), 1);
    // The flavor capped the sharepool; the configured cap comes back.
    let cap = t
        .state
        .join("pool")
        .join(cph_runtime::storage::SHARE_LIMIT_FILE);
    let read_cap = || {
        std::fs::read_to_string(&cap)
            .expect("sharepool cap")
            .trim()
            .to_string()
    };
    assert_eq!(read_cap(), (2u64 << 30).to_string());
    let st = delete_server(&addr, &token, &server);
    assert_eq!(st["status"], 2, "{st}");
    assert!(
        st["execute_msg"]
            .as_str()
            .is_some_and(|m| m.contains("1 phones deleted") && m.contains("sharepool emptied")),
        "{st}"
    );
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones, json!([]));
    for dir in ["files", "apps"] {
        let left: Vec<_> = std::fs::read_dir(share.join(dir))
            .expect("share dir")
            .collect();
        assert!(left.is_empty(), "share/{dir} holds {left:?}");
    }
    assert_eq!(std::fs::read_to_string(&keys).expect("authorized_keys"), "");
    assert_eq!(read_cap(), "0", "the configured cap (none)");
    assert_eq!(placements(), 0);
    // Asked again, the deletion is the same job, already done.
    assert_eq!(delete_server(&addr, &token, &server)["status"], 2);
}

/// A finished job's output, trimmed.
fn output(st: &Value) -> String {
    st["execute_msg"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn records_of_long_ended_jobs_are_removed() {
    if !cph_runtime::privilege::check("records_of_long_ended_jobs_are_removed") {
        return;
    }
    use cph_agent::daemon::jobstore::{succeeded, JobStore};
    use cph_agent::protocol::{JobKind, JobRequest};
    // Jobs an earlier run of the agent recorded: one ended long ago, one
    // just now.
    let tmp = tempfile::tempdir().expect("tempdir");
    let jobs = tmp.path().join("state/jobs");
    {
        let (store, _) = JobStore::open(&jobs).expect("job store");
        for id in ["ancient", "fresh"] {
            let req = JobRequest {
                job_id: id.into(),
                request_id: "r".into(),
                server_id: "s".into(),
                phone_id: None,
                kind: JobKind::StartPhone,
            };
            store.insert(&req).expect("insert");
            store.finish(succeeded(id, Some("done"))).expect("finish");
        }
    }
    let ancient = jobs.join("ancient.json");
    let mut rec: Value =
        serde_json::from_slice(&std::fs::read(&ancient).expect("read")).expect("record");
    rec["ended"] = json!(1_000);
    std::fs::write(&ancient, rec.to_string()).expect("write");

    // Kept a day, the old one is gone once the agent is up (the sweep runs
    // at start, then hourly), the recent one still answers.
    let t = TestAgent::start_in(tmp, "jobgc", false, "job_retention_hours = 24");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ancient.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old record was kept"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(&t.addr, "GET", "/v1/jobs/ancient", &t.token, None).0,
        404
    );
    let (code, fresh) = http(&t.addr, "GET", "/v1/jobs/fresh", &t.token, None);
    assert_eq!((code, output(&fresh)), (200, "done".to_string()), "{fresh}");
}
