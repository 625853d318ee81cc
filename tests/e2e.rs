//! The platform end to end through its real binaries, as a user runs it:
//! `cph up` (object store, control plane and one agent as supervised
//! processes) over a fresh data dir, then only the CPH REST API, signed
//! with the project's AK/SK from `credentials.json`. The local server is
//! bought, every phone job kind runs and its effect is checked inside the
//! phone, then the agent is killed and `cph up` stopped and started again:
//! phones outlive both, and the platform's state survives.

#[path = "e2e/api.rs"]
mod api;
#[path = "e2e/archive.rs"]
mod archive;
#[path = "../benches/common/bins.rs"]
mod bins;
#[path = "e2e/platform.rs"]
mod platform;

use std::time::{Duration, Instant};

use cph_agent::objstore::{ObjectStore, ObjectStoreConfig};
use serde_json::{json, Value};

use api::Api;
use platform::Platform;

const DEV_SERVER_MODEL: &str = "physical.dev.local";
const DEV_PHONE_MODEL: &str = "dev.cp.c1.m512";
const TEST_IMAGE_ID: &str = "cph0test0image00000000000000001";
const BUCKET: &str = "e2e";
/// Buying to running phones: image import, volumes, containers, heartbeat.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// A phone state change reaches the API with the next heartbeat (10 s).
const STATUS_LIMIT: Duration = Duration::from_secs(30);

/// The platform's object store through the agent crate's S3 client.
struct Obs {
    rt: tokio::runtime::Runtime,
    store: ObjectStore,
}

impl Obs {
    fn new(creds: &Value) -> Self {
        let s = |k: &str| creds[k].as_str().expect("obs credentials").to_string();
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let cfg = ObjectStoreConfig::local(s("obs_endpoint"), s("obs_ak"), s("obs_sk"));
        let store = {
            let _g = rt.enter();
            ObjectStore::new(&cfg).expect("object store client")
        };
        rt.block_on(store.create_bucket(BUCKET))
            .expect("create bucket");
        Self { rt, store }
    }

    fn put(&self, key: &str, data: Vec<u8>) {
        self.rt
            .block_on(self.store.put_bytes(BUCKET, key, data))
            .unwrap_or_else(|e| panic!("put obs://{BUCKET}/{key}: {e}"));
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.rt
            .block_on(self.store.get_bytes(BUCKET, key, 64 << 20))
            .unwrap_or_else(|e| panic!("get obs://{BUCKET}/{key}: {e}"))
            .to_vec()
    }

    /// The keys of a bucket of the platform's store.
    fn keys(&self, bucket: &str) -> Vec<String> {
        self.rt
            .block_on(self.store.list(bucket, ""))
            .unwrap_or_else(|e| panic!("list obs://{bucket}: {e}"))
            .into_iter()
            .map(|o| o.key)
            .collect()
    }
}

/// Prints each step with the time since the start.
struct Steps(Instant);

impl Steps {
    fn step(&self, what: &str) {
        println!("[{:6.1}s] {what}", self.0.elapsed().as_secs_f64());
    }
}

/// The start time of the phone's init (`/proc/1/stat` field 22): changes
/// exactly when the phone's container is started again.
fn init_start(api: &Api, phone: &str) -> String {
    let out = api.shell(phone, "cut -d' ' -f22 /proc/1/stat");
    let t = out.trim().to_string();
    assert!(
        !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()),
        "init start time of {phone}: {out:?}"
    );
    t
}

/// Runs `cph <command> --credentials <data>/credentials.json <args>`; its stdout.
fn cph_cli(p: &Platform, args: &[&str]) -> String {
    let out = std::process::Command::new(platform::cph())
        .arg(args[0])
        .arg("--credentials")
        .arg(p.data.join("credentials.json"))
        .args(&args[1..])
        .output()
        .expect("run cph");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cph {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `cph` command as a client of the running platform.
fn cph_client(p: &Platform, s: &Scene<'_>) {
    let servers = cph_cli(p, &["servers"]);
    assert!(servers.contains(s.server_id), "{servers}");
    let phones = cph_cli(p, &["phones", "--server", s.server_id]);
    assert!(phones.contains(s.a) && phones.contains(s.b), "{phones}");
    let out = cph_cli(p, &["shell", s.a, "--", "echo", "from-the-cli"]);
    assert!(out.contains("from-the-cli"), "{out}");
    // A local tar: uploaded to the platform's store, pushed, followed.
    let dir = tempfile::tempdir().expect("tempdir");
    let tar = dir.path().join("cli.tar");
    std::fs::write(
        &tar,
        archive::tar_of(&[("data/local/tmp/cli/pushed.txt", b"pushed by the cli\n")]),
    )
    .expect("write tar");
    let out = cph_cli(p, &["push", &tar.to_string_lossy(), s.a, s.b]);
    assert_eq!(out.matches(": ok").count(), 2, "{out}");
    let out = cph_cli(
        p,
        &["shell", s.b, "--", "cat", "/data/local/tmp/cli/pushed.txt"],
    );
    assert!(out.contains("pushed by the cli"), "{out}");
    let job_id = out
        .split_whitespace()
        .nth(1)
        .map(|w| w.trim_end_matches(':').to_string())
        .expect("job id in the output");
    let out = cph_cli(p, &["job", &job_id]);
    assert!(out.contains("ok"), "{out}");

    // A local APK installed in both phones, then uninstalled from them.
    let apk = dir.path().join("cli.apk");
    std::fs::write(&apk, archive::apk("com.e2e.cli")).expect("write apk");
    let out = cph_cli(
        p,
        &[
            "install",
            &apk.to_string_lossy(),
            s.a,
            s.b,
            "--options",
            "-r -t",
        ],
    );
    assert_eq!(out.matches(": ok").count(), 2, "{out}");
    assert!(s
        .api
        .shell(s.b, "pm list packages")
        .contains("package:com.e2e.cli"));
    let out = cph_cli(p, &["uninstall", "com.e2e.cli", s.a, s.b]);
    assert_eq!(out.matches(": ok").count(), 2, "{out}");
    assert!(!s.api.shell(s.a, "pm list packages").contains("com.e2e.cli"));
    // Stop, then restart: running again.
    let out = cph_cli(p, &["stop", s.b]);
    assert!(out.contains(": ok"), "{out}");
    let out = cph_cli(p, &["restart", s.b]);
    assert!(out.contains(": ok"), "{out}");
    assert!(s.api.shell(s.b, "echo back").contains("back"));
    // A reset: the image again, what was pushed gone.
    let out = cph_cli(p, &["reset", s.b]);
    assert!(out.contains(": ok"), "{out}");
    let left = s.api.shell(
        s.b,
        "test -e /data/local/tmp/cli/pushed.txt && echo kept || echo gone",
    );
    assert_eq!(left.trim(), "gone");
}

#[test]
fn platform_end_to_end_through_cph_up_and_the_cph_api() {
    if !cph_runtime::privilege::check("platform_end_to_end_through_cph_up_and_the_cph_api") {
        return;
    }
    let mut p = Platform::new(platform::cph(), platform::image());
    let steps = Steps(Instant::now());

    steps.step("cph up");
    let creds = p.start();
    let api = Api::new(&creds);
    let obs = Obs::new(&creds);

    steps.step("buy the local server");
    let server_id = buy(&api);
    let phones = api.wait_server_ready(&server_id, READY_LIMIT);
    assert!(phones.len() >= 2, "the dev server has 2 phones: {phones:?}");
    let s = Scene {
        api: &api,
        obs: &obs,
        server_id: &server_id,
        a: &phones[0],
        b: &phones[1],
    };

    steps.step("the cph client: servers, phones, shell, push with a progress bar, job");
    cph_client(&p, &s);
    steps.step("sync and async shell");
    s.shells();
    steps.step("push a tar from the object store");
    s.push();
    steps.step("install an APK, list it, uninstall it");
    s.install_uninstall();
    steps.step("property update");
    s.property();
    steps.step("export to the object store, then restore");
    s.export_restore();
    steps.step("share files: push, list, delete");
    s.share_files();
    steps.step("share apps: push, delete");
    s.share_apps();
    steps.step("keypair update");
    s.keypair();
    steps.step("rename");
    api.put(
        &format!("phones/{}", s.a),
        json!({"phone_name": "e2e-renamed"}),
    )
    .ok("rename");
    assert_eq!(api.phone(s.a)["phone_name"], "e2e-renamed");
    steps.step("migrate one phone onto the other (the reference's body)");
    s.migrate();
    steps.step("restart");
    let started = s.restart();
    steps.step("stop, then reset");
    s.stop_then_reset();
    steps.step("traffic diversion");
    s.traffic();
    steps.step("bandwidth");
    s.bandwidth(&p);

    steps.step("kill the agent");
    let agent = p.agent_pid().expect("cph-agent run is a child of cph up");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the agent");
    // `cph up` supervises its services: the agent comes back, the platform
    // stays up.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(p.try_wait().is_none(), "cph up stopped when its agent died");
        if p.agent_pid().is_some_and(|pid| pid != agent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cph up did not restart its agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("  cph up restarted its agent");
    assert_eq!(
        init_start(&api, s.a),
        started,
        "the phone outlives its agent"
    );
    assert!(api.shell(s.b, "echo new-job").contains("new-job"));

    steps.step("stop cph up (SIGTERM) and start it again");
    let status = p.stop().expect("cph up stopped");
    assert!(status.success(), "cph up after SIGTERM: {status}");
    let again = p.start();
    for k in ["project_id", "ak", "sk", "obs_ak", "obs_sk"] {
        assert_eq!(creds[k], again[k], "credentials.json {k} after a restart");
    }
    s.survived(&phones, &started);

    steps.step("delete the server with the cph client, then buy the host again");
    let out = cph_cli(&p, &["delete-server", &server_id]);
    assert!(
        out.contains(&format!("{server_id} ")) && out.contains(": ok"),
        "{out}"
    );
    assert!(!cph_cli(&p, &["servers"]).contains(server_id.as_str()));
    for phone in &phones {
        assert!(
            !std::path::Path::new(&format!("/run/netns/cph-{phone}")).exists(),
            "network of {phone} left after the server's deletion"
        );
    }
    let again = buy(&api);
    assert_ne!(again, server_id);
    assert!(!api.wait_server_ready(&again, READY_LIMIT).is_empty());
    steps.step("done");
}

/// `cph up --user-namespaces`: the phones of the bought server run on btrfs
/// volumes, each in a user namespace of its own, and jobs reach them
/// through the same API.
#[test]
fn phones_in_user_namespaces_through_cph_up() {
    let name = "phones_in_user_namespaces_through_cph_up";
    if !cph_runtime::privilege::check(name) {
        return;
    }
    if std::process::Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED {name}: mkfs.btrfs is missing");
        return;
    }
    // A small pool: the test's temporary directory may be a small tmpfs.
    let mut p = Platform::new(platform::cph(), platform::image()).with_args(&[
        "--user-namespaces",
        "--pool-size-gb",
        "1",
    ]);
    let creds = p.start();
    let api = Api::new(&creds);
    let obs = Obs::new(&creds);
    let server_id = buy(&api);
    let phones = api.wait_server_ready(&server_id, READY_LIMIT);
    assert!(phones.len() >= 2, "the dev server has 2 phones: {phones:?}");
    let mut ranges = Vec::new();
    for phone in &phones[..2] {
        let out = api.shell(phone, "id -u; cat /proc/self/uid_map");
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 4, "{out:?}");
        assert_eq!(&words[..2], ["0", "0"], "root inside {phone}: {out:?}");
        let host: u32 = words[2].parse().expect("host id");
        assert!(host >= 1_000_000, "{phone} maps root to host id {host}");
        ranges.push(host);
    }
    assert_ne!(ranges[0], ranges[1], "two phones share a host id range");
    let s = Scene {
        api: &api,
        obs: &obs,
        server_id: &server_id,
        a: &phones[0],
        b: &phones[1],
    };
    s.push();
    s.install_uninstall();
}

/// The bought server, its two phones and the clients, for the steps.
struct Scene<'a> {
    api: &'a Api,
    obs: &'a Obs,
    server_id: &'a str,
    a: &'a str,
    b: &'a str,
}

impl Scene<'_> {
    /// Sync shell on one phone; async shell on every phone of the server.
    fn shells(&self) {
        let j = self.api.sync_shell(self.a, "echo hello-from-e2e");
        assert_eq!(j["status"], 2, "sync shell: {j}");
        assert!(
            j["execute_msg"]
                .as_str()
                .is_some_and(|m| m.contains("hello-from-e2e")),
            "sync shell output: {j}"
        );
        let resp = self.api.post(
            "phones/commands",
            json!({"command": "shell", "content": "getprop ro.boot.serialno; echo async-ok", "server_ids": [self.server_id]}),
        );
        let ids = Api::job_ids(resp, "async shell");
        assert_eq!(ids.len(), 2, "one job per phone of the server");
        for id in &ids {
            let j = self.api.wait_job(id);
            assert_eq!(j["status"], 2, "async shell: {j}");
            assert!(
                j["execute_msg"]
                    .as_str()
                    .is_some_and(|m| m.contains("async-ok")),
                "{j}"
            );
        }
    }

    fn push(&self) {
        let tar = archive::tar_of(&[("data/local/tmp/e2e/pushed.txt", b"pushed through obs\n")]);
        self.obs.put("push/e2e.tar", tar);
        self.api.run_ok(
            self.api.post(
                "phones/commands",
                json!({"command": "push", "content": format!("obs://{BUCKET}/push/e2e.tar"), "phone_ids": [self.a]}),
            ),
            "push",
        );
        assert_eq!(
            self.api.shell(self.a, "cat /data/local/tmp/e2e/pushed.txt"),
            "pushed through obs\n"
        );
    }

    fn install_uninstall(&self) {
        self.obs.put("apps/e2e.apk", archive::apk("com.e2e.app"));
        self.api.run_ok(
            self.api.post(
                "phones/commands",
                json!({"command": "install", "content": format!("-r -t obs://{BUCKET}/apps/e2e.apk"), "phone_ids": [self.a]}),
            ),
            "install",
        );
        let listed = self.api.shell(self.a, "pm list packages");
        assert!(
            listed.lines().any(|l| l == "package:com.e2e.app"),
            "installed packages: {listed:?}"
        );
        self.api.run_ok(
            self.api.post(
                "phones/commands",
                json!({"command": "uninstall", "content": "com.e2e.app", "phone_ids": [self.a]}),
            ),
            "uninstall",
        );
        let listed = self.api.shell(self.a, "pm list packages");
        assert!(
            !listed.contains("com.e2e.app"),
            "still installed: {listed:?}"
        );
    }

    /// A live property: set in the running phone (`getprop`) and recorded.
    fn property(&self) {
        let before = self.api.shell(self.a, "getprop com.cph.mainkeys");
        let want = if before.trim() == "1" { "0" } else { "1" };
        let property = json!({"com.cph.mainkeys": want}).to_string();
        self.api.run_ok(
            self.api.post(
                "phones/batch-update-property",
                json!({"phones": [{"phone_id": self.a, "property": property}]}),
            ),
            "update property",
        );
        assert_eq!(
            self.api.shell(self.a, "getprop com.cph.mainkeys").trim(),
            want
        );
        let detail = self.api.phone(self.a);
        assert!(
            detail["property"]
                .as_str()
                .is_some_and(|p| p.contains("com.cph.mainkeys")),
            "property not in the phone detail: {detail}"
        );
    }

    /// `batch-storage` writes the included path as a tar to the store;
    /// `batch-restore` puts its content back.
    fn export_restore(&self) {
        let (api, a) = (self.api, self.a);
        api.shell(a, "mkdir -p /data/e2e && echo original > /data/e2e/f");
        api.run_ok(
            api.post(
                "phones/batch-storage",
                json!({"storage_infos": [{"phone_id": a, "include_files": ["/data/e2e"], "bucket_name": BUCKET, "object_path": "export/e2e.tar"}]}),
            ),
            "export",
        );
        let names = archive::tar_names(&self.obs.get("export/e2e.tar"));
        assert!(
            names.iter().any(|n| n == "data/e2e/f"),
            "export lists {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("data/local")),
            "export holds more than the included path: {names:?}"
        );
        api.shell(a, "echo changed > /data/e2e/f");
        api.run_ok(
            api.post(
                "phones/batch-restore",
                json!({"restore_infos": [{"phone_id": a, "bucket_name": BUCKET, "object_path": "export/e2e.tar"}]}),
            ),
            "restore",
        );
        assert_eq!(api.shell(a, "cat /data/e2e/f"), "original\n");
    }

    /// Server-level share files: seen by every phone, listed, deleted.
    fn share_files(&self) {
        let api = self.api;
        let tar = archive::tar_of(&[("data/shared-e2e.txt", b"shared with every phone\n")]);
        self.obs.put("share/files.tar", tar);
        api.run_ok(
            api.post(
                "phones/share-files",
                json!({"bucket_name": BUCKET, "object_path": "share/files.tar", "server_ids": [self.server_id]}),
            ),
            "share files push",
        );
        for ph in [self.a, self.b] {
            assert_eq!(
                api.shell(ph, "cat /data/media/share/files/data/shared-e2e.txt"),
                "shared with every phone\n"
            );
        }
        let query = format!("path=/data&server_ids={}", self.server_id);
        let j = api.run_ok(api.get("servers/share-files", &query), "share files list");
        let listing: Value = serde_json::from_str(j["execute_msg"].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("share listing is not json ({e}): {j}"));
        let files = listing["files_in_path"]["files"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            files
                .iter()
                .any(|f| f.as_str().is_some_and(|f| f.ends_with(" shared-e2e.txt"))),
            "share listing: {listing}"
        );
        api.run_ok(
            api.delete(
                "phones/share-files",
                json!({"file_paths": ["/data/shared-e2e.txt"], "server_ids": [self.server_id]}),
            ),
            "share files delete",
        );
        let gone = api.shell_job(self.a, "cat /data/media/share/files/data/shared-e2e.txt");
        assert_eq!(gone["status"], -1, "shared file still there: {gone}");
    }

    /// Server-level share apps: the app's tar seen by the phones, deleted.
    fn share_apps(&self) {
        let api = self.api;
        let tar = archive::tar_of(&[("base.apk", &archive::apk("com.e2e.shared"))]);
        self.obs.put("share/app.tar", tar);
        api.run_ok(
            api.post(
                "phones/share-apps",
                json!({"package_name": "com.e2e.shared", "bucket_name": BUCKET, "object_path": "share/app.tar", "server_ids": [self.server_id]}),
            ),
            "share apps push",
        );
        let seen = api.shell(self.b, "ls /data/media/share/apps/com.e2e.shared");
        assert!(
            seen.contains("base.apk"),
            "shared app in the phone: {seen:?}"
        );
        api.run_ok(
            api.delete(
                "phones/share-apps",
                json!({"package_names": ["com.e2e.shared"], "server_ids": [self.server_id]}),
            ),
            "share apps delete",
        );
        let gone = api.shell_job(self.b, "ls /data/media/share/apps/com.e2e.shared");
        assert_eq!(gone["status"], -1, "shared app still there: {gone}");
    }

    /// `PUT servers/open-access` with the reference's body.
    fn keypair(&self) {
        let j = self.api.run_one(
            self.api.put(
                "servers/open-access",
                json!({"servers": [{"server_id": self.server_id, "keypair_name": "default"}]}),
            ),
            "keypair update",
        );
        assert_eq!(j["status"], 2, "keypair update: {j}");
        for ph in [self.a, self.b] {
            let keys = self.api.shell(ph, "cat /data/misc/adb/adb_keys");
            assert!(
                keys.contains("cph-up"),
                "adb_keys after the keypair update: {keys:?}"
            );
        }
    }

    /// The phone's init starts again, its data stays; the new init start time.
    fn restart(&self) -> String {
        let started = init_start(self.api, self.a);
        self.api.run_ok(
            self.api.post(
                "phones/batch-restart",
                json!({"phones": [{"phone_id": self.a}]}),
            ),
            "restart",
        );
        let restarted = init_start(self.api, self.a);
        assert_ne!(started, restarted, "the phone's init was not started again");
        assert_eq!(
            self.api.shell(self.a, "cat /data/e2e/f"),
            "original\n",
            "data survives a restart"
        );
        restarted
    }

    /// A stopped phone (status 8) refuses commands; a reset starts it again
    /// from its image, without what was written before.
    /// `batch-migrate` a -> b with no bucket named: a is stopped and written
    /// through the platform's store, b restored from it with a's properties.
    fn migrate(&self) {
        let (api, a, b) = (self.api, self.a, self.b);
        api.shell(a, "mkdir -p /data/mig && echo travelled > /data/mig/f");
        let resp = api.post(
            "phones/batch-migrate",
            json!({"migrate_infos": [{"source_phone_id": a, "target_phone_id": b,
                                      "is_migrate_property": "true"}]}),
        );
        let j = api.run_ok(resp, "migrate");
        assert_eq!(j["status"], 2, "migrate: {j}");
        api.wait_phone_status(a, 8, STATUS_LIMIT);
        api.wait_phone_status(b, 2, STATUS_LIMIT);
        assert!(api.shell(b, "cat /data/mig/f").contains("travelled"));
        // The phone's copy in the platform's bucket went once restored.
        assert_eq!(
            self.obs.keys(cph_agent::protocol::MIGRATE_BUCKET),
            Vec::<String>::new()
        );
        let prop = api.phone(a)["property"].as_str().unwrap_or("").to_string();
        if prop.contains("com.cph.mainkeys") {
            assert!(
                api.shell(b, "getprop com.cph.mainkeys").trim() == "1",
                "properties did not travel"
            );
        }
        // The source stays stopped until asked: a restart brings it back.
        api.run_ok(
            api.post("phones/batch-restart", json!({"phones": [{"phone_id": a}]})),
            "restart the migrated source",
        );
        api.wait_phone_status(a, 2, STATUS_LIMIT);
    }

    fn stop_then_reset(&self) {
        let (api, b) = (self.api, self.b);
        api.shell(b, "echo before-reset > /data/reset-marker");
        api.run_ok(
            api.post("phones/batch-stop", json!({"phone_ids": [b]})),
            "stop",
        );
        api.wait_phone_status(b, 8, STATUS_LIMIT);
        let refused = api.shell_job(b, "true");
        assert_eq!(refused["status"], -1, "shell on a stopped phone: {refused}");
        assert_eq!(refused["error_code"], "CPS.0141", "{refused}");
        api.run_ok(
            api.post("phones/batch-reset", json!({"phones": [{"phone_id": b}]})),
            "reset",
        );
        api.wait_phone_status(b, 2, STATUS_LIMIT);
        let after = api.shell_job(b, "cat /data/reset-marker");
        assert_eq!(
            after["status"], -1,
            "a file written before the reset is still there: {after}"
        );
        assert!(api.shell(b, "echo alive").contains("alive"));
    }

    /// After restarts: the server and its phones as before, every job seen
    /// earlier answering as it ended, the phone never restarted, and a new
    /// sync shell.
    fn survived(&self, phones: &[String], started: &str) {
        let api = self.api;
        let listed = api.get("servers", "").ok("server list");
        assert!(
            listed["servers"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["server_id"] == self.server_id)),
            "server list after a restart: {listed}"
        );
        assert_eq!(api.wait_server_ready(self.server_id, STATUS_LIMIT), phones);
        let ended = api.ended_jobs();
        for before in &ended {
            let id = before["job_id"].as_str().expect("job id");
            let after = api.job(id);
            for k in ["status", "error_code", "execute_msg", "end_time"] {
                assert_eq!(before[k], after[k], "job {id} {k} after restarts: {after}");
            }
        }
        println!("  {} earlier jobs answer as before", ended.len());
        assert_eq!(
            init_start(api, self.a),
            started,
            "the phone outlives cph up"
        );
        let j = api.sync_shell(self.a, "cat /data/e2e/f");
        assert_eq!(j["status"], 2, "sync shell after a restart: {j}");
        assert_eq!(j["execute_msg"], "original\n");
    }

    /// Traffic diversion (`phones-traffic`): the phone's default route moves
    /// to the encoding container and back.
    fn traffic(&self) {
        let (api, phone) = (self.api, self.a);
        let mut routes = Vec::new();
        for kind in ["routing", "direct"] {
            let j = api.run_one(
                api.post(
                    "phones-traffic",
                    json!({"phone_ids": [phone], "traffic_type": kind}),
                ),
                &format!("traffic {kind}"),
            );
            assert_eq!(j["status"], 2, "traffic {kind}: {j}");
            routes.push(api.shell(phone, "ip route | grep '^default'"));
        }
        assert!(
            routes.iter().all(|r| r.contains("default via")),
            "default routes: {routes:?}"
        );
        assert_ne!(
            routes[0], routes[1],
            "routing and direct use the same route"
        );
    }

    /// The shared bandwidth of the bought server (`bandwidths/{id}`).
    fn bandwidth(&self, p: &Platform) {
        let api = self.api;
        let bws = api.get("bandwidths", "").ok("bandwidth list");
        let bw = bws["band_widths"]
            .as_array()
            .and_then(|v| v.iter().find(|b| b["band_width_share_type"] == 1).cloned())
            .unwrap_or_else(|| panic!("no shared bandwidth listed after buying one: {bws}"));
        assert_eq!(bw["band_width_size"], 100, "{bw}");
        let id = bw["band_width_id"].as_str().expect("band_width_id");
        api.put(&format!("bandwidths/{id}"), json!({"band_width_size": 200}))
            .ok("bandwidth update");
        let after = api.get("bandwidths", "").ok("bandwidth list");
        assert!(
            after["band_widths"].as_array().is_some_and(|v| v
                .iter()
                .any(|b| b["band_width_id"] == id && b["band_width_size"] == 200)),
            "bandwidth after the update: {after}"
        );
        // The agent reshapes the server's class on its bridge.
        let bridge = p.bridge().expect("cph up's agent has a bridge");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = std::process::Command::new("tc")
                .args(["class", "show", "dev", &bridge])
                .output()
                .expect("tc");
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains("rate 200Mbit") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the bridge {bridge} was not reshaped to 200Mbit: {text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `POST /v2/.../servers` with the development flavor; the server id.
fn buy(api: &Api) -> String {
    let body = json!({
        "server_name": "e2e",
        "server_model_name": DEV_SERVER_MODEL,
        "phone_model_name": DEV_PHONE_MODEL,
        "image_id": TEST_IMAGE_ID,
        "count": 1,
        "keypair_name": "default",
        "extend_param": {"charging_mode": 0, "period_type": 2, "period_num": 1, "is_auto_pay": 1},
        "tenant_vpc_id": "00000000-0000-0000-0000-000000000000",
        "nics": [{"subnet_id": "00000000-0000-0000-0000-000000000001"}],
        "public_ip": {"eip": null, "ids": null},
        "band_width": {"band_width_share_type": 1, "band_width_charge_mode": 0, "band_width_size": 100},
    });
    // The local host is on sale once its agent has registered.
    let offerings = format!("/v1/{}/server-model-offerings", api.project_id);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = api.call("GET", &offerings, "", None).ok("offerings");
        let on_sale = o["models"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["model_name"] == DEV_SERVER_MODEL && m["sell_status"] == "available");
        if on_sale {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no host of {DEV_SERVER_MODEL} on sale: {o}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let path = format!("/v2/{}/cloud-phone/servers", api.project_id);
    let out = api.call("POST", &path, "", Some(&body)).ok("buy");
    out["server_ids"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no server bought: {out}"))
        .to_string()
}
