//! Object-store jobs end to end: the real `cph-agent run` with a real phone
//! of the test image and the embedded S3 store, driven through the agent
//! protocol. Push (good, escaping, missing, not a tar), install of an
//! APK-shaped zip and refusal of a non-APK, export with include/exclude,
//! restore, share files push/list/delete, share apps push/delete, and the
//! source side of a migration. Every effect is checked inside the phone or
//! in the store.

mod common;

use common::{http, job, server_job, wait_job, TestAgent};
use cph_agent::objstore::{serve, ObjectStore};
use serde_json::{json, Value};

const AK: &str = "transfer-ak";
const SK: &str = "transfer-sk-0123456789";
const BUCKET: &str = "jobs-bucket";

/// A tar of `(path, contents)` regular files.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A tar whose only entry climbs out of the target (`../../<name>`), with
/// the name written into the header directly as a hostile tool would.
fn escaping_tar(name: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    let path = format!("../../{name}");
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_size(4);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(b"evil");
    out.resize(512 * 2, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// An APK-shaped zip: a manifest naming `package`, and a dex.
fn apk(package: &str) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut out);
        let opts = zip::write::SimpleFileOptions::default();
        w.start_file("AndroidManifest.xml", opts).expect("zip");
        write!(
            w,
            "<?xml version=\"1.0\"?><manifest package=\"{package}\"></manifest>"
        )
        .expect("zip");
        w.start_file("classes.dex", opts).expect("zip");
        w.write_all(b"dex\n035\0").expect("zip");
        w.finish().expect("zip");
    }
    out.into_inner()
}

fn tar_names(data: &[u8]) -> Vec<String> {
    let mut ar = tar::Archive::new(data);
    ar.entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

struct Phone {
    addr: String,
    token: String,
    server: String,
    phone: String,
    n: u32,
}

impl Phone {
    /// Submits a job request (its `job_id` filled in here) and waits for its end.
    fn submit(&mut self, request: impl FnOnce(&str) -> Value) -> Value {
        self.n += 1;
        let id = format!("t{}-{}", std::process::id(), self.n);
        let (code, body) = http(
            &self.addr,
            "POST",
            "/v1/jobs",
            &self.token,
            Some(&request(&id)),
        );
        assert_eq!(code, 200, "{body}");
        wait_job(&self.addr, &self.token, &id)
    }

    fn run(&mut self, kind: Value) -> Value {
        let (server, phone) = (self.server.clone(), self.phone.clone());
        self.submit(|id| job(id, &server, &phone, kind))
    }

    fn run_server(&mut self, kind: Value) -> Value {
        let server = self.server.clone();
        self.submit(|id| server_job(id, &server, kind))
    }

    fn sh(&mut self, command: &str) -> String {
        let st = self.run(json!({"kind": "sync_shell", "command": command, "timeout_ms": 2000}));
        assert_eq!(st["status"], 2, "{command}: {st}");
        st["execute_msg"].as_str().unwrap_or_default().to_string()
    }

    fn state(&self) -> Value {
        let (_, phones) = http(&self.addr, "GET", "/v1/phones", &self.token, None);
        phones[0]["state"].clone()
    }
}

fn obj(key: &str) -> Value {
    json!({"bucket": BUCKET, "key": key})
}

fn assert_failed(st: &Value, code: &str) {
    assert_eq!(st["status"], -1, "{st}");
    assert_eq!(st["error_code"], code, "{st}");
}

/// The embedded store serving `dir` on a free port with [`BUCKET`] made,
/// and a client of it.
fn start_store(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (cph_agent::objstore::EmbeddedStore, ObjectStore) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind store");
    let server_store = rt
        .block_on(serve(dir.to_path_buf(), listener, AK.into(), SK.into()))
        .expect("embedded store");
    let store = ObjectStore::new(&server_store.client_config()).expect("client");
    rt.block_on(store.create_bucket(BUCKET)).expect("bucket");
    (server_store, store)
}

#[test]
fn object_store_jobs_on_a_real_phone() {
    if !cph_runtime::privilege::check("object_store_jobs_on_a_real_phone") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server_store, store) = start_store(&rt, &tmp.path().join("store"));
    let put = |key: &str, data: Vec<u8>| {
        rt.block_on(store.put_bytes(BUCKET, key, data))
            .expect("put object");
    };

    let store_toml = format!(
        "[object_store]\nendpoint = \"{}\"\naccess_key = \"{AK}\"\nsecret_key = \"{SK}\"\n",
        server_store.endpoint()
    );
    let mut t = TestAgent::start_in(tmp, "transfer", true, &store_toml);
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let (state, parent, shim) = (t.state.clone(), t.parent.clone(), t.shim.clone());
    let net = t.net.clone().expect("network");

    let server = format!("ts{pid}");
    let phone_id = format!("tp{pid}");
    let create = json!({
        "server_id": server, "server_name": "transfer",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                    "core_bind_strategy": "dev_small", "extend_spec": {"max_share_disk_size_g": "3"}},
        "image": {"image_id": "img", "url": format!("file://{}", common::image().display())},
        "ports": [], "band_width_size": 10, "public_key": null,
        "phones": [{"phone_id": phone_id, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    let created = wait_job(&addr, &token, &format!("{server}:create:{phone_id}"));
    assert_eq!(created["status"], 2, "{created}");
    let mut p = Phone {
        addr: addr.clone(),
        token: token.clone(),
        server: server.clone(),
        phone: phone_id.clone(),
        n: 0,
    };

    // Push: the tar lands in the phone's root.
    put(
        "push/ok.tar",
        tar_of(&[
            ("data/local/pushed/hello.txt", b"hello push"),
            ("data/local/pushed/skip/no.txt", b"not exported"),
        ]),
    );
    let st = p.run(json!({"kind": "push", "object": obj("push/ok.tar")}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.sh("cat /data/local/pushed/hello.txt"), "hello push");

    // Bad pushes fail with the reference's codes and write nothing outside.
    let escape_name = format!("escaped-{pid}.txt");
    put("push/escape.tar", escaping_tar(&escape_name));
    assert_failed(
        &p.run(json!({"kind": "push", "object": obj("push/escape.tar")})),
        "CPS.0119",
    );
    for dir in [
        t.tmp.path().to_path_buf(),
        state.clone(),
        state.join("phones"),
        std::path::PathBuf::from("/"),
    ] {
        assert!(!dir.join(&escape_name).exists(), "escaped into {dir:?}");
    }
    put("push/garbage.tar", vec![0x5a; 4096]);
    assert_failed(
        &p.run(json!({"kind": "push", "object": obj("push/garbage.tar")})),
        "CPS.0119",
    );
    assert_failed(
        &p.run(json!({"kind": "push", "object": obj("push/missing.tar")})),
        "CPS.0104",
    );

    // Install: checked, placed, installed by the image's pm; its files gone after.
    put("apps/game.apk", apk("com.example.game"));
    let st =
        p.run(json!({"kind": "install", "flags": ["-r", "-t"], "objects": [obj("apps/game.apk")]}));
    assert_eq!(st["status"], 2, "{st}");
    assert!(
        p.sh("pm list packages")
            .contains("package:com.example.game"),
        "package not installed"
    );
    assert_eq!(
        p.sh("ls /data/local/tmp | grep -c cph-install || true")
            .trim(),
        "0"
    );
    put("apps/not.apk", b"this is not a zip".to_vec());
    assert_failed(
        &p.run(json!({"kind": "install", "flags": [], "objects": [obj("apps/not.apk")]})),
        "CPS.0119",
    );
    put("apps/split.apk", apk("com.other.app"));
    assert_failed(
        &p.run(json!({"kind": "install", "flags": ["-r"],
                      "objects": [obj("apps/game.apk"), obj("apps/split.apk")]})),
        "CPS.0118",
    );
    assert_failed(
        &p.run(json!({"kind": "install", "flags": ["--evil"], "objects": [obj("apps/game.apk")]})),
        "CPS.0118",
    );

    // Export: include/exclude over /data, written to the store.
    let st = p.run(json!({"kind": "export", "object": obj("export/phone.tar"),
                          "include": ["/data/local/pushed"], "exclude": ["/data/local/pushed/skip"]}));
    assert_eq!(st["status"], 2, "{st}");
    let exported = rt
        .block_on(store.get_bytes(BUCKET, "export/phone.tar", 1 << 30))
        .expect("export object");
    let names = tar_names(&exported);
    assert!(
        names.iter().any(|n| n == "data/local/pushed/hello.txt"),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("skip")), "{names:?}");
    assert_failed(
        &p.run(json!({"kind": "export", "object": obj("export/bad.tar"),
                      "include": ["/system"], "exclude": []})),
        "CPS.0168",
    );

    // Restore brings the exported bytes back; the phone runs again after.
    p.sh("echo changed > /data/local/pushed/hello.txt");
    // (A migration's target phase is a restore carrying the source's properties.)
    let st = p.run(json!({"kind": "restore", "object": obj("export/phone.tar"),
                          "property": {"persist.sys.locale": "fr-FR"}}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "running");
    assert_eq!(p.sh("cat /data/local/pushed/hello.txt"), "hello push");
    assert_eq!(p.sh("getprop persist.sys.locale").trim(), "fr-FR");
    // A missing object is found before the phone is stopped: the same init
    // runs after the job; an object that is no tar stops the phone, which
    // runs again after.
    let init_start = |p: &mut Phone| p.sh("cut -d' ' -f22 /proc/1/stat").trim().to_string();
    let before = init_start(&mut p);
    assert_failed(
        &p.run(json!({"kind": "restore", "object": obj("export/none.tar")})),
        "CPS.0104",
    );
    assert_eq!(init_start(&mut p), before, "the phone was restarted");
    put("export/not-a-tar.tar", b"plain text, no tar".repeat(64));
    assert_failed(
        &p.run(json!({"kind": "restore", "object": obj("export/not-a-tar.tar")})),
        "CPS.0119",
    );
    assert_eq!(p.state(), "running");
    // A tar that goes bad after its first entries leaves the phone as it
    // was: it is unpacked aside, and only a whole one goes in.
    p.sh("echo kept > /data/local/pushed/half.txt");
    let mut half = tar_of(&[
        ("data/local/pushed/half.txt", b"from a bad tar"),
        ("data/local/pushed/new.txt", b"from a bad tar"),
    ]);
    half.truncate(half.len() - 1024);
    half.extend_from_slice(&[0xa5; 1536]);
    put("export/half.tar", half);
    assert_failed(
        &p.run(json!({"kind": "restore", "object": obj("export/half.tar")})),
        "CPS.0119",
    );
    assert_eq!(p.sh("cat /data/local/pushed/half.txt").trim(), "kept");
    assert_eq!(
        p.sh("ls -a / /data/local/pushed | grep -c -e cph-migrate -e new.txt; true")
            .trim(),
        "0"
    );

    // Share files: pushed once for the server, seen in the phone, listed, deleted.
    put(
        "share/files.tar",
        tar_of(&[("data/shared.txt", b"for every phone")]),
    );
    let st = p.run_server(
        json!({"kind": "share_push_files", "object": obj("share/files.tar"), "target_dir": "/"}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("cat /data/media/share/files/data/shared.txt"),
        "for every phone"
    );
    assert!(
        p.sh("touch /data/media/share/files/x 2>&1 || echo refused")
            .contains("refused"),
        "the share is read-only inside phones"
    );
    // Whatever modes the archive gives, the share is readable by every
    // phone and writable by none (a phone with a user namespace of its own
    // reads it as any user would).
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o777);
    h.set_size(0);
    b.append_data(&mut h, "open", std::io::empty())
        .expect("dir");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(6);
    b.append_data(&mut h, "open/secret", &b"secret"[..])
        .expect("file");
    put("share/modes.tar", b.into_inner().expect("tar"));
    let st = p.run_server(
        json!({"kind": "share_push_files", "object": obj("share/modes.tar"), "target_dir": "/"}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("stat -c %a /data/media/share/files/open /data/media/share/files/open/secret"),
        "755\n644\n"
    );
    // A missing object makes no directory.
    let st = p.run_server(
        json!({"kind": "share_push_files", "object": obj("share/none.tar"), "target_dir": "/new"}),
    );
    assert_failed(&st, "CPS.0104");
    assert_eq!(
        p.sh("test -e /data/media/share/files/new && echo made || echo none")
            .trim(),
        "none"
    );
    let st = p
        .run_server(json!({"kind": "share_list_files", "path": "/data", "offset": 0, "limit": 10}));
    assert_eq!(st["status"], 2, "{st}");
    let listing: Value =
        serde_json::from_str(st["execute_msg"].as_str().unwrap_or("null")).expect("listing json");
    assert_eq!(listing["files_in_path"]["total"], 1, "{listing}");
    assert!(
        listing["files_in_path"]["files"][0]
            .as_str()
            .unwrap_or("")
            .ends_with(" shared.txt"),
        "{listing}"
    );
    assert!(listing["share_base_capacity"].is_string(), "{listing}");
    // The flavor's max_share_disk_size_g caps the sharepool.
    assert_eq!(
        listing["share_base_max_size"],
        cph_runtime::storage::human(3 << 30),
        "{listing}"
    );
    let st = p.run_server(json!({"kind": "share_delete_files", "paths": ["/data/shared.txt"]}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("test -e /data/media/share/files/data/shared.txt && echo yes || echo no")
            .trim(),
        "no"
    );
    assert_failed(
        &p.run_server(json!({"kind": "share_delete_files", "paths": ["/data/../../etc"]})),
        "CPS.0155",
    );

    // Share apps.
    put(
        "share/app.tar",
        tar_of(&[("base.apk", &apk("com.example.shared"))]),
    );
    let st = p.run_server(
        json!({"kind": "share_push_apps", "object": obj("share/app.tar"),
                                 "package_name": "com.example.shared"}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("test -s /data/media/share/apps/com.example.shared/base.apk && echo yes")
            .trim(),
        "yes"
    );
    // A new version replaces the old whole, and leaves nothing beside it.
    put(
        "share/app2.tar",
        tar_of(&[("split.apk", &apk("com.example.shared"))]),
    );
    let st = p.run_server(
        json!({"kind": "share_push_apps", "object": obj("share/app2.tar"),
                                 "package_name": "com.example.shared"}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("ls -A /data/media/share/apps /data/media/share/apps/com.example.shared"),
        "/data/media/share/apps:\ncom.example.shared\n\n/data/media/share/apps/com.example.shared:\nsplit.apk\n"
    );
    // Pre-installed: in every running phone of the server, from the
    // sharepool.
    assert!(!p.sh("pm list packages").contains("com.example.shared"));
    let st = p.run_server(
        json!({"kind": "share_push_apps", "object": obj("share/app.tar"),
               "package_name": "com.example.shared", "pre_install": true}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert!(
        st["execute_msg"]
            .as_str()
            .is_some_and(|m| m.ends_with("installed in 1 running phones")),
        "{st}"
    );
    assert!(
        p.sh("pm list packages")
            .contains("package:com.example.shared"),
        "installed"
    );
    // An app without an APK cannot be pre-installed.
    put("share/noapk.tar", tar_of(&[("readme.txt", b"no apk")]));
    assert_failed(
        &p.run_server(
            json!({"kind": "share_push_apps", "object": obj("share/noapk.tar"),
                   "package_name": "com.example.noapk", "pre_install": true}),
        ),
        "CPS.0119",
    );
    let st =
        p.run_server(json!({"kind": "share_delete_apps", "package_names": ["com.example.noapk"]}));
    assert_eq!(st["status"], 2, "{st}");
    let st =
        p.run_server(json!({"kind": "share_delete_apps", "package_names": ["com.example.shared"]}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        p.sh("test -e /data/media/share/apps/com.example.shared && echo yes || echo no")
            .trim(),
        "no"
    );

    // Keypair: the key lands in the phone's adb_keys; a link the phone
    // planted never steers the write onto the host.
    let key = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{pid} test@cph");
    let st = p.run(json!({"kind": "update_keypair", "public_key": key}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.sh("cat /data/misc/adb/adb_keys").trim(), key);
    // The server's keypair change (the API's form) reaches all its phones.
    let server_key = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAS{pid} server@cph");
    let st = p.run_server(json!({"kind": "update_keypair", "public_key": server_key}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.sh("cat /data/misc/adb/adb_keys").trim(), server_key);
    let hosts =
        std::fs::read_to_string(state.join("ssh/authorized_keys")).expect("authorized_keys");
    assert!(hosts.lines().any(|l| l == server_key), "{hosts}");
    p.sh("rm -rf /data/misc/adb && ln -s / /data/misc/adb");
    let st = p.run(json!({"kind": "update_keypair", "public_key": key}));
    assert_eq!(st["status"], -1, "{st}");
    assert!(!std::path::Path::new("/adb_keys").exists());
    // A server's change names the phones that could not take the key.
    let st = p.run_server(json!({"kind": "update_keypair", "public_key": server_key}));
    let want = format!("key installed in 0 of 1 phones; not in {} (", p.phone);
    assert!(
        st["error_msg"]
            .as_str()
            .is_some_and(|m| m.starts_with(&want)),
        "{st}"
    );

    // The link out of the way, and the phone's own key (not the server's)
    // in place: the migration below carries it.
    p.sh("rm /data/misc/adb");
    let st = p.run(json!({"kind": "update_keypair", "public_key": key}));
    assert_eq!(st["status"], 2, "{st}");

    // Migration, source side: stopped, whole phone in the store.
    let st = p
        .run(json!({"kind": "migrate", "object": {"bucket": "cph-migrate", "key": "m/phone.tar"}, "keep_property": true}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "stopped");
    let whole = rt
        .block_on(store.get_bytes("cph-migrate", "m/phone.tar", 1 << 30))
        .expect("migration object");
    let names = tar_names(&whole);
    assert!(names.iter().any(|n| n == "init"), "no init in {names:?}");
    assert!(
        names.iter().any(|n| n == "data/local/pushed/hello.txt"),
        "no data in the migration"
    );
    assert!(!names.iter().any(|n| n.starts_with("data/media/share/")));

    // A job on a stopped phone: CPS.0141.
    for kind in [
        json!({"kind": "push", "object": obj("push/ok.tar")}),
        json!({"kind": "shell", "command": "true"}),
        json!({"kind": "sync_shell", "command": "true", "timeout_ms": 2000}),
        json!({"kind": "uninstall", "flags": [], "package": "com.example.app"}),
    ] {
        assert_failed(&p.run(kind), "CPS.0141");
    }

    // Reset from an image in the store: imported once, the phone runs it
    // and what was pushed before is gone.
    put(
        "images/test.tar.gz",
        std::fs::read(common::image()).expect("read test image"),
    );
    let obs_image = json!({"image_id": format!("obs-img-{pid}"),
                           "url": format!("obs://{BUCKET}/images/test.tar.gz")});
    let st = p.run(json!({"kind": "reset_phone", "image": obs_image, "property": null}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "running");
    assert_eq!(
        p.sh("test -e /data/local/pushed/hello.txt && echo yes || echo no")
            .trim(),
        "no"
    );
    // Its `/data` is new, and the server's key is back in it.
    assert_eq!(p.sh("cat /data/misc/adb/adb_keys").trim(), server_key);
    // Migration, target side: the whole phone replaces this one's root,
    // what only this phone had included; a missing object changes nothing.
    p.sh("mkdir -p /data/local/only-here && echo x > /data/local/only-here/f");
    let st = p.run(json!({"kind": "restore", "whole_phone": true,
                          "object": {"bucket": "cph-migrate", "key": "m/none.tar"}}));
    assert_failed(&st, "CPS.0104");
    assert_eq!(p.sh("cat /data/local/only-here/f").trim(), "x");
    // A phone cut off in the middle: unpacked aside and dropped, so the
    // failure names nothing as written and the phone is as it was.
    rt.block_on(store.put_bytes(
        "cph-migrate",
        "m/cut.tar",
        whole[..whole.len() / 2].to_vec(),
    ))
    .expect("put cut object");
    let st = p.run(json!({"kind": "restore", "whole_phone": true,
                          "object": {"bucket": "cph-migrate", "key": "m/cut.tar"}}));
    assert_failed(&st, "CPS.0119");
    let msg = st["error_msg"].as_str().unwrap_or_default();
    assert!(
        msg.ends_with("the phone's root is as it was") && !msg.contains("were written"),
        "{st}"
    );
    assert_eq!(st["execute_msg"], Value::Null, "{st}");
    assert_eq!(p.state(), "running");
    assert_eq!(p.sh("cat /data/local/only-here/f").trim(), "x");
    assert_eq!(
        p.sh("test -e /.cph-migrate-in && echo left || echo gone")
            .trim(),
        "gone"
    );
    // Through a bucket of the user's (the job, not the bucket, says it is
    // a whole phone), the object removed once restored as asked.
    put("m/phone.tar", whole.to_vec());
    let st = p.run(
        json!({"kind": "restore", "whole_phone": true, "remove_object": true,
                          "object": obj("m/phone.tar")}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "running");
    assert_eq!(
        p.sh("test -e /data/local/only-here && echo stale || echo replaced")
            .trim(),
        "replaced"
    );
    assert!(p.sh("cat /data/local/pushed/hello.txt").contains("hello"));
    // The migrated phone's `adb_keys` held the key it had; this server's
    // takes its place.
    assert!(names.iter().any(|n| n == "data/misc/adb/adb_keys"));
    assert_eq!(p.sh("cat /data/misc/adb/adb_keys").trim(), server_key);
    assert!(
        rt.block_on(store.head(BUCKET, "m/phone.tar")).is_err(),
        "the restored object was kept"
    );

    // A custom image of the running phone: its whole root is written, the
    // phone runs again, and a reset to the image brings back what it held.
    let image_key = format!("p/img-{pid}.tar");
    let st = p.run(
        json!({"kind": "create_image", "image_id": format!("img-{pid}"),
                          "object": {"bucket": "cph-images", "key": image_key}}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "running");
    let size = cph_agent::protocol::image_size(st["execute_msg"].as_str().unwrap_or_default())
        .expect("image size in the answer");
    let whole = rt
        .block_on(store.get_bytes("cph-images", &image_key, 1 << 30))
        .expect("image object");
    assert_eq!(whole.len() as u64, size);
    let names = tar_names(&whole);
    assert!(names.iter().any(|n| n == "init"), "no init in {names:?}");
    assert!(names.iter().any(|n| n == "data/local/pushed/hello.txt"));
    assert!(!names.iter().any(|n| n.starts_with("data/media/share/")));
    p.sh("rm -r /data/local/pushed");
    let custom = json!({"image_id": format!("custom-{pid}"),
                        "url": format!("obs://cph-images/{image_key}")});
    let images = state.join("pool").join("images");
    assert!(images.join(format!("obs-img-{pid}")).is_dir());
    let st = p.run(json!({"kind": "reset_phone", "image": custom, "property": null}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "running");
    assert!(p.sh("cat /data/local/pushed/hello.txt").contains("hello"));
    // The image the phone left, imported from the store and used by
    // nothing else, is removed.
    assert_eq!(
        st["execute_msg"],
        json!(format!("unused image removed: obs-img-{pid}"))
    );
    assert!(!images.join(format!("obs-img-{pid}")).exists());
    // A stopped phone stays stopped.
    assert_eq!(p.run(json!({"kind": "stop_phone"}))["status"], 2);
    let st = p.run(
        json!({"kind": "create_image", "image_id": format!("img2-{pid}"),
                          "object": {"bucket": "cph-images", "key": format!("p/img2-{pid}.tar")}}),
    );
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "stopped");
    assert_eq!(p.run(json!({"kind": "start_phone"}))["status"], 2);
    assert_eq!(p.state(), "running");
    let missing =
        json!({"image_id": "obs-missing", "url": format!("obs://{BUCKET}/images/none.tar")});
    assert_failed(
        &p.run(json!({"kind": "reset_phone", "image": missing, "property": null})),
        "CPS.0166",
    );

    // A second server whose phone runs the custom image: once released, the
    // image only it used goes with it; the first phone and its image stay.
    let second = format!("ts2{pid}");
    let phone2 = format!("tp2{pid}");
    let custom2 = format!("custom2-{pid}");
    let mut create2 = create.clone();
    create2["server_id"] = json!(second);
    create2["image"] = json!({"image_id": custom2, "url": format!("obs://cph-images/{image_key}")});
    // With an encoding server, made from the custom image too (its job may
    // run before any phone of the server imported the image).
    create2["flavor"]["extend_spec"]["encode_server_spec"] =
        json!({"cpu": 1, "memory": 128, "disk": 1});
    create2["phones"] =
        json!([{"phone_id": phone2, "phone_name": "phone-2", "slot": 0, "property": {}}]);
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create2));
    assert_eq!(code, 200, "{body}");
    let created = wait_job(&addr, &token, &format!("{second}:create:{phone2}"));
    assert_eq!(created["status"], 2, "{created}");
    let encoder = wait_job(&addr, &token, &format!("{second}:encoder"));
    assert_eq!(encoder["status"], 2, "{encoder}");
    assert!(images.join(&custom2).is_dir());
    let st = common::delete_server(&addr, &token, &second);
    assert_eq!(st["status"], 2, "{st}");
    let msg = st["execute_msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("unused images removed: {custom2}")),
        "{msg}"
    );
    assert!(!images.join(&custom2).exists());
    assert!(
        images.join(format!("custom-{pid}")).is_dir(),
        "the first phone's image"
    );
    assert!(images.join("img").is_dir(), "the catalog's image stays");
    assert_eq!(p.state(), "running");
    // A restart onto the catalog's image updates the phone keeping its
    // /data: what it wrote there stays, what it wrote elsewhere goes with
    // the old image, and the custom image, used by nothing now, goes too
    // (the catalog's, a `file://` image, would stay unused).
    p.sh("echo kept > /data/local/kept.txt && echo gone > /etc/outside.txt");
    let catalog = create["image"].clone();
    let st = p.run(json!({"kind": "restart_phone", "image": catalog, "property": null}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(
        st["execute_msg"],
        json!(format!("unused image removed: custom-{pid}"))
    );
    assert_eq!(p.state(), "running");
    assert_eq!(p.sh("cat /data/local/kept.txt").trim(), "kept");
    assert!(p.sh("cat /data/local/pushed/hello.txt").contains("hello"));
    assert_eq!(
        p.sh("test -e /etc/outside.txt && echo stale || echo updated")
            .trim(),
        "updated"
    );
    assert!(!images.join(format!("custom-{pid}")).exists());
    assert!(images.join("img").is_dir());
    // A restart naming the image the phone already runs is a plain one.
    let st =
        p.run(json!({"kind": "restart_phone", "image": create["image"].clone(), "property": null}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(st["execute_msg"], Value::Null);
    assert_eq!(p.sh("cat /data/local/kept.txt").trim(), "kept");

    // `cph-agent purge` with the agent stopped: no container, volume mount,
    // netns, veth, bridge or nft table of this agent is left on the host.
    t.agent.kill();
    let purge = std::process::Command::new(env!("CARGO_BIN_EXE_cph-agent"))
        .arg("--config")
        .arg(&t.config)
        .arg("purge")
        .output()
        .expect("run cph-agent purge");
    assert!(purge.status.success(), "{purge:?}");
    assert!(String::from_utf8_lossy(&purge.stdout).contains(&phone_id));
    let rt_check = cph_runtime::container::Runtime::new(&state.join("containers"), &parent, &shim)
        .expect("runtime");
    assert!(rt_check.list().expect("list").is_empty());
    assert_eq!(
        cph_runtime::container::cgroups_named(&parent),
        Vec::<std::path::PathBuf>::new(),
        "parent cgroup left"
    );
    assert!(common::mounts_under(t.tmp.path()).is_empty(), "mounts left");
    assert!(net.veths().is_empty(), "veths left");
    assert!(!std::path::Path::new(&format!("/run/netns/cph-{phone_id}")).exists());
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    assert!(!String::from_utf8_lossy(&tables.stdout).contains(&net.table));
    let links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip");
    assert!(!String::from_utf8_lossy(&links.stdout).contains(&format!("{}:", net.bridge)));
    let _ = rt.block_on(server_store.shutdown());
}

/// A TCP proxy in front of the store: requests pass until one whose text
/// (lowercased) `hold` picks; that connection is then held open with
/// nothing more forwarded, as over a network that stopped. (A double of
/// the network between agent and store, nothing of ours.)
async fn holding_proxy(
    store: String,
    hold: impl Fn(&str) -> bool + Send + Sync + Copy + 'static,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind proxy");
    let addr = listener.local_addr().expect("proxy addr");
    let store = store.trim_start_matches("http://").to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&store).await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    if hold(&text) {
                        // Both halves stay open: the request just hangs.
                        std::future::pending::<()>().await;
                    }
                    if uw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A push the agent is killed in the middle of: at its next start the job
/// is failed (CPS.0054) naming what it may have written, which holds at
/// least everything that is in the phone, and the phone runs on.
#[test]
fn a_push_cut_off_by_a_kill_names_what_it_may_have_written() {
    if !cph_runtime::privilege::check("a_push_cut_off_by_a_kill_names_what_it_may_have_written") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server_store, store) = start_store(&rt, &tmp.path().join("store"));
    // 300 files of 1,000 bytes (1.5 KiB each in the tar); the download
    // stalls at 320 KiB, about 200 entries in.
    let names: Vec<String> = (0..300)
        .map(|i| format!("data/local/cut/f{i:03}"))
        .collect();
    let files: Vec<(&str, &[u8])> = names
        .iter()
        .map(|n| (n.as_str(), &[7u8; 1000][..]))
        .collect();
    rt.block_on(store.put_bytes(BUCKET, "push/cut.tar", tar_of(&files)))
        .expect("put object");
    // The download of the push hangs at its ranges past 320 KiB, the
    // upload of an export at its second part.
    let endpoint = rt.block_on(holding_proxy(server_store.endpoint(), |text| {
        let range_past = text.split("range: bytes=").skip(1).any(|rest| {
            rest.split('-')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|start| start >= 320 << 10)
        });
        range_past || text.contains("partnumber=2&") || text.contains("partnumber=2 ")
    }));
    let store_toml = format!(
        "[object_store]\nendpoint = \"{endpoint}\"\naccess_key = \"{AK}\"\nsecret_key = \"{SK}\"\n\
         [object_store.transfer]\nrange_bytes = 65536\n"
    );
    let mut t = TestAgent::start_in(tmp, "pushkill", false, &store_toml);
    let (addr, token, pid) = (t.addr.clone(), t.token.clone(), std::process::id());
    let server = format!("ks{pid}");
    let phone = format!("kp{pid}");
    let create = json!({
        "server_id": server, "server_name": "pushkill",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                    "core_bind_strategy": "dev_small", "extend_spec": {}},
        "image": {"image_id": "img", "url": format!("file://{}", common::image().display())},
        "ports": [], "band_width_size": 10, "public_key": null,
        "phones": [{"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = http(&addr, "POST", "/v1/servers", &token, Some(&create));
    assert_eq!(code, 200, "{body}");
    let created = wait_job(&addr, &token, &format!("{server}:create:{phone}"));
    assert_eq!(created["status"], 2, "{created}");

    let state: Value = serde_json::from_slice(
        &std::fs::read(t.state.join(format!("containers/cph-{phone}/state.json")))
            .expect("container state"),
    )
    .expect("json");
    let init = state["pid"].as_i64().expect("init pid");
    let cut = std::path::PathBuf::from(format!("/proc/{init}/root/data/local/cut"));
    let on_disk = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&cut)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let (code, body) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "push-cut",
            &server,
            &phone,
            json!({"kind": "push", "object": obj("push/cut.tar")}),
        )),
    );
    assert_eq!(code, 200, "{body}");
    // Wait until the writers wrote what reached them and the download hangs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = on_disk();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let now = on_disk();
        if !now.is_empty() && now == seen {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "nothing written");
        seen = now;
    }
    let (_, st) = http(&addr, "GET", "/v1/jobs/push-cut", &token, None);
    assert_eq!(st["status"], 1, "the push hangs on its download: {st}");
    t.agent.kill();
    let journal = t.state.join("jobs/push-cut.written");
    assert!(journal.is_file(), "the journal outlives the kill");
    t.agent.restart();

    let st = wait_job(&addr, &token, "push-cut");
    assert_failed(&st, "CPS.0054");
    let msg = st["error_msg"].as_str().expect("error_msg");
    let noted: usize = msg
        .split("; ")
        .find_map(|part| part.strip_suffix(" paths may have been written before it stopped"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of paths in {msg:?}"));
    // Everything in the phone (the new directory and its files) is
    // counted; the journal runs ahead by at most the batches not yet
    // handed to the writers.
    let written = on_disk();
    assert!(
        noted > written.len() && noted <= written.len() + 1 + 2 * 64,
        "{noted} noted, {} in the phone",
        written.len()
    );
    let list = st["execute_msg"].as_str().expect("execute_msg");
    let mut lines = list.lines();
    assert_eq!(
        lines.next(),
        Some("may have been written before the agent stopped:")
    );
    assert_eq!(lines.next(), Some("data/local/cut"));
    let listed: Vec<&str> = lines.take_while(|l| *l != "...").collect();
    assert!(listed.len() > 20, "{list}");
    for l in &listed {
        let name = l.strip_prefix("data/local/cut/").expect("a pushed path");
        assert!(
            written.iter().any(|w| w == name),
            "{l} listed, not in the phone"
        );
    }
    assert!(!journal.exists(), "the journal is removed once read");
    // The phone ran through the agent's restart.
    let (_, phones) = http(&addr, "GET", "/v1/phones", &token, None);
    assert_eq!(phones[0]["state"], "running", "{phones}");

    // An export killed with its upload open: the upload is ended at the
    // agent's next start, its parts no longer held in the store.
    let big = std::path::PathBuf::from(format!("/proc/{init}/root/data/local/big"));
    std::fs::write(&big, vec![7u8; 20 << 20]).expect("a large file in the phone");
    let (code, body) = http(
        &addr,
        "POST",
        "/v1/jobs",
        &token,
        Some(&job(
            "export-cut",
            &server,
            &phone,
            json!({"kind": "export", "object": obj("export/cut.tar"),
                   "include": ["/data/local/big"], "exclude": []}),
        )),
    );
    assert_eq!(code, 200, "{body}");
    let note = t.state.join("jobs/export-cut.upload");
    // Hang guards: an emulated CPU (the cgroup v2 VM) takes over 30 s to
    // store the first part of a debug build's export.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let upload_id = loop {
        let noted = std::fs::read(&note)
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok());
        if let Some(id) = noted.as_ref().and_then(|n| n["upload_id"].as_str()) {
            break id.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no upload noted");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let parts = || {
        rt.block_on(
            store
                .sdk()
                .list_parts()
                .bucket(BUCKET)
                .key("export/cut.tar")
                .upload_id(&upload_id)
                .send(),
        )
        .map(|p| p.parts().len())
        .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while parts() == 0 {
        assert!(std::time::Instant::now() < deadline, "no part stored");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    t.agent.kill();
    t.agent.restart();
    assert_failed(&wait_job(&addr, &token, "export-cut"), "CPS.0054");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while note.exists() || parts() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed export's upload is still open ({} parts)",
            parts()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = rt.block_on(server_store.shutdown());
}

/// After a kill of the agent: the installation files a job it cut off left
/// in a phone are gone once it starts again, the phone's own files kept;
/// and a phone recorded as stopped whose container still runs (a stop that
/// failed) is stopped before a restore rewrites its root, and stays
/// stopped.
#[test]
fn an_agent_restart_clears_install_leftovers_and_a_restore_stops_what_runs() {
    if !cph_runtime::privilege::check(
        "an_agent_restart_clears_install_leftovers_and_a_restore_stops_what_runs",
    ) {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server_store, store) = start_store(&rt, &tmp.path().join("store"));
    let store_toml = format!(
        "[object_store]\nendpoint = \"{}\"\naccess_key = \"{AK}\"\nsecret_key = \"{SK}\"\n",
        server_store.endpoint()
    );
    let mut t = TestAgent::start_in(tmp, "leftover", false, &store_toml);
    let pid = std::process::id();
    let (server, phone) = (format!("ls{pid}"), format!("lp{pid}"));
    let create = json!({
        "server_id": server, "server_name": "leftover",
        "flavor": {"flavor_id": "dev", "vcpus": 1, "memory_mb": 256, "disk_gb": 1, "phone_capacity": 1,
                    "core_bind_strategy": "dev_small", "extend_spec": {}},
        "image": {"image_id": "img", "url": format!("file://{}", common::image().display())},
        "ports": [], "band_width_size": 10, "public_key": null,
        "phones": [{"phone_id": phone, "phone_name": "phone-1", "slot": 0, "property": {}}]
    });
    let (code, body) = t.http("POST", "/v1/servers", Some(&create));
    assert_eq!(code, 200, "{body}");
    let created = t.wait_job(&format!("{server}:create:{phone}"));
    assert_eq!(created["status"], 2, "{created}");
    let mut p = Phone {
        addr: t.addr.clone(),
        token: t.token.clone(),
        server: server.clone(),
        phone: phone.clone(),
        n: 0,
    };
    p.sh("mkdir -p /data/local/tmp/cph-install-cut && echo apk > /data/local/tmp/cph-install-cut/0.apk && echo mine > /data/local/tmp/keep.txt");

    t.agent.kill();
    // A stop whose container did not stop: the record says stopped.
    let record = t.state.join(format!("phones/cph-{phone}.json"));
    let mut rec: Value =
        serde_json::from_slice(&std::fs::read(&record).expect("record")).expect("json");
    rec["stopped"] = json!(true);
    std::fs::write(&record, rec.to_string()).expect("write record");
    t.agent.restart();

    assert_eq!(
        p.sh("ls -A /data/local/tmp"),
        "keep.txt\n",
        "the installation files were left"
    );
    assert_eq!(p.state(), "running");
    rt.block_on(store.put_bytes(
        BUCKET,
        "restore/r.tar",
        tar_of(&[("data/local/restored.txt", b"restored")]),
    ))
    .expect("put object");
    let st = p.run(json!({"kind": "restore", "object": obj("restore/r.tar")}));
    assert_eq!(st["status"], 2, "{st}");
    assert_eq!(p.state(), "stopped", "the phone ran through its restore");
    assert_eq!(p.run(json!({"kind": "start_phone"}))["status"], 2);
    assert_eq!(p.sh("cat /data/local/restored.txt"), "restored");
    let _ = rt.block_on(server_store.shutdown());
}
