//! The object-store client against the real embedded S3 server on loopback:
//! whole-object operations, typed errors, size limits before download,
//! streamed download and multipart upload with bounded memory, credentials,
//! and a tar exported to the store and extracted back while streaming (from
//! the received buffers, as the agent extracts a push).

use std::io::{Read, Write};
use std::time::Duration;

use cph_agent::objstore::{
    serve, EmbeddedStore, ObjectStore, ObjectStoreConfig, ObjectStoreError, ObjectUrl,
};

const AK: &str = "test-ak";
const SK: &str = "test-sk-0123456789";
const BUCKET: &str = "push-bucket";
const MIB: usize = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    server: EmbeddedStore,
    store: ObjectStore,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = serve(dir.path().join("store"), listener, AK.into(), SK.into())
        .await
        .unwrap();
    let store = ObjectStore::new(&server.client_config()).unwrap();
    store.create_bucket(BUCKET).await.unwrap();
    Fixture {
        _dir: dir,
        server,
        store,
    }
}

/// Deterministic bytes that differ at every offset (xorshift).
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_head_list_delete() {
    let f = fixture().await;
    let s = &f.store;
    s.put_bytes(BUCKET, "my_apps/a.tar", b"hello".to_vec())
        .await
        .unwrap();
    s.put_bytes(BUCKET, "my_apps/b.apk", vec![7u8; 1000])
        .await
        .unwrap();
    s.put_bytes(BUCKET, "other/c", b"c".to_vec()).await.unwrap();
    assert_eq!(s.head(BUCKET, "my_apps/b.apk").await.unwrap().size, 1000);
    assert_eq!(
        &s.get_bytes(BUCKET, "my_apps/a.tar", 100).await.unwrap()[..],
        b"hello"
    );
    let listed: Vec<(String, u64)> = s
        .list(BUCKET, "my_apps/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("my_apps/a.tar".to_string(), 5),
            ("my_apps/b.apk".to_string(), 1000)
        ]
    );
    assert_eq!(s.list(BUCKET, "").await.unwrap().len(), 3);
    s.delete(BUCKET, "my_apps/a.tar").await.unwrap();
    assert!(matches!(
        s.head(BUCKET, "my_apps/a.tar").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
    assert_eq!(s.list(BUCKET, "my_apps/").await.unwrap().len(), 1);
    // Objects are plain files beneath the root, one directory per bucket.
    assert!(f.server.root().join(BUCKET).join("other/c").is_file());
    // Creating an existing bucket is fine.
    s.create_bucket(BUCKET).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_object_and_bucket_are_typed() {
    let f = fixture().await;
    let s = &f.store;
    let e = s.head(BUCKET, "nope.tar").await.unwrap_err();
    assert!(
        matches!(&e, ObjectStoreError::NotFound { key, .. } if key == "nope.tar"),
        "{e:?}"
    );
    assert!(e.to_string().contains("obs://push-bucket/nope.tar"), "{e}");
    let e = s.get_bytes(BUCKET, "nope.tar", 10).await.unwrap_err();
    assert!(matches!(e, ObjectStoreError::NotFound { .. }), "{e:?}");
    let e = s
        .download_to_reader(BUCKET, "nope.tar", 10)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ObjectStoreError::NotFound { .. }), "{e:?}");
    let e = s.list("no-such-bucket", "").await.unwrap_err();
    assert!(matches!(e, ObjectStoreError::NoSuchBucket { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limit_refused_before_download() {
    let f = fixture().await;
    let data = pattern(3 * MIB, 1);
    f.store
        .put_bytes(BUCKET, "big.tar", data.clone())
        .await
        .unwrap();
    let limit = MIB as u64;
    let e = f
        .store
        .download_to_reader(BUCKET, "big.tar", limit)
        .await
        .err()
        .unwrap();
    match &e {
        ObjectStoreError::TooLarge { size, limit: l, .. } => {
            assert_eq!(*size, data.len() as u64);
            assert_eq!(*l, limit);
        }
        other => panic!("expected too large, got {other:?}"),
    }
    assert!(e.to_string().contains("over the limit"), "{e}");
    let e = f
        .store
        .get_bytes(BUCKET, "big.tar", limit)
        .await
        .unwrap_err();
    assert!(matches!(e, ObjectStoreError::TooLarge { .. }), "{e:?}");
    // At the limit it passes.
    let got = f
        .store
        .get_bytes(BUCKET, "big.tar", data.len() as u64)
        .await
        .unwrap();
    assert_eq!(got.len(), data.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_download_is_identical_with_bounded_memory() {
    let f = fixture().await;
    let data = pattern(40 * MIB + 12_345, 2);
    f.store
        .put_bytes(BUCKET, "stream.bin", data.clone())
        .await
        .unwrap();
    let mut reader = f
        .store
        .download_to_reader(BUCKET, "stream.bin", u64::MAX)
        .await
        .unwrap();
    assert_eq!(reader.info().size, data.len() as u64);
    let stats = reader.stats();
    let got = tokio::task::spawn_blocking(move || {
        let mut first = [0u8; 1];
        reader.read_exact(&mut first).unwrap();
        // A slow consumer: the download fills its buffers and must stop there.
        std::thread::sleep(Duration::from_millis(300));
        let mut rest = Vec::new();
        let mut chunk = vec![0u8; 61 * 1024];
        loop {
            let n = reader.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        let mut all = first.to_vec();
        all.extend_from_slice(&rest);
        all
    })
    .await
    .unwrap();
    assert!(got == data, "streamed bytes differ");
    let bound = ObjectStoreConfig::default()
        .transfer
        .download_memory_bound();
    assert!(
        stats.peak_buffered() <= bound,
        "peak {} over {bound}",
        stats.peak_buffered()
    );
    assert!(stats.peak_buffered() < data.len() as u64);
    assert_eq!(stats.bytes_read(), data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_uploads_multipart_and_small_objects_whole() {
    let f = fixture().await;
    let data = pattern(20 * MIB + 777, 3);
    let mut w = f.store.writer(BUCKET, "export/phone.tar").unwrap();
    let payload = data.clone();
    let report = tokio::task::spawn_blocking(move || {
        // Odd-sized writes, as a tar writer makes.
        for chunk in payload.chunks(100_003) {
            w.write_all(chunk).unwrap();
        }
        assert_eq!(w.written(), payload.len() as u64);
        w.finish()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.bytes, data.len() as u64);
    assert_eq!(report.parts, 3, "8 MiB parts: 8 + 8 + 4");
    let got = f
        .store
        .get_bytes(BUCKET, "export/phone.tar", u64::MAX)
        .await
        .unwrap();
    assert!(got[..] == data[..], "uploaded bytes differ");

    let report = f
        .store
        .upload_with(BUCKET, "export/small", |w| w.write_all(b"small object"))
        .await
        .unwrap();
    assert_eq!(report.parts, 0);
    assert_eq!(
        &f.store
            .get_bytes(BUCKET, "export/small", 100)
            .await
            .unwrap()[..],
        b"small object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upload_leaves_no_object() {
    let f = fixture().await;
    let e = f
        .store
        .upload_with(BUCKET, "export/failed.tar", |w| {
            w.write_all(&pattern(9 * MIB, 4))?;
            Err(std::io::Error::other("phone stopped"))
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("phone stopped"), "{e}");
    // The uploader aborts on its own; give it a moment to finish.
    for _ in 0..50 {
        if f.store.list(BUCKET, "export/").await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        f.store.head(BUCKET, "export/failed.tar").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused() {
    let f = fixture().await;
    f.store.put_bytes(BUCKET, "k", b"v".to_vec()).await.unwrap();
    for (ak, sk) in [(AK, "wrong-secret"), ("wrong-ak", SK)] {
        let mut cfg = f.server.client_config();
        cfg.ak = ak.into();
        cfg.sk = sk.into();
        cfg.max_attempts = 1;
        let bad = ObjectStore::new(&cfg).unwrap();
        let e = bad.get_bytes(BUCKET, "k", 10).await.unwrap_err();
        assert!(
            matches!(e, ObjectStoreError::AccessDenied { .. }),
            "{ak}: {e:?}"
        );
        let e = bad
            .put_bytes(BUCKET, "k2", b"v".to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(e, ObjectStoreError::AccessDenied { .. }),
            "{ak}: {e:?}"
        );
    }
    assert!(matches!(
        f.store.head(BUCKET, "k2").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_store_is_unreachable() {
    let f = fixture().await;
    let mut cfg = f.server.client_config();
    cfg.max_attempts = 2;
    cfg.initial_backoff_ms = 10;
    f.server.shutdown().await.unwrap();
    let s = ObjectStore::new(&cfg).unwrap();
    let e = s.head(BUCKET, "k").await.unwrap_err();
    assert!(matches!(e, ObjectStoreError::Unreachable { .. }), "{e:?}");
    assert!(e.is_transient());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addressing_follows_path_style_setting() {
    let hour = Duration::from_secs(3600);
    let local =
        ObjectStore::new(&ObjectStoreConfig::local("http://127.0.0.1:9000", "a", "s")).unwrap();
    let url = local
        .presigned_get("push-bucket", "my_apps/test.tar", hour)
        .await
        .unwrap();
    assert!(
        url.starts_with("http://127.0.0.1:9000/push-bucket/my_apps/test.tar?"),
        "{url}"
    );
    let obs = ObjectStore::new(&ObjectStoreConfig {
        endpoint: "https://obs.cn-north-4.myhuaweicloud.com".into(),
        region: "cn-north-4".into(),
        ak: "a".into(),
        sk: "s".into(),
        path_style: false,
        ..ObjectStoreConfig::default()
    })
    .unwrap();
    let url = obs
        .presigned_get("push-bucket", "my_apps/test.tar", hour)
        .await
        .unwrap();
    assert!(
        url.starts_with("https://push-bucket.obs.cn-north-4.myhuaweicloud.com/my_apps/test.tar?"),
        "{url}"
    );
    assert!(url.contains("X-Amz-Credential=a%2F"), "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_exported_to_store_and_extracted_while_streaming() {
    use cph_runtime::archive::{extract_lent, write_tar, ExtractOptions};
    let f = fixture().await;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("data/app")).unwrap();
    std::fs::write(src.join("data/app/big.bin"), pattern(11 * MIB, 5)).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("data/app/f{i}")), format!("file {i}")).unwrap();
    }
    let root = src.clone();
    let up = f
        .store
        .upload_with(BUCKET, "export/data.tar", move |w| {
            write_tar(&root, &[], &[], w)
                .map(|_| ())
                .map_err(std::io::Error::other)
        })
        .await
        .unwrap();
    assert!(up.parts >= 2, "{up:?}");
    let url = ObjectUrl::parse("obs://push-bucket/export/data.tar").unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let target = dst.clone();
    let report = f
        .store
        .download_with(
            &url.bucket,
            &url.key,
            cph_agent::objstore::PUSH_MAX_BYTES,
            // As the agent extracts a push: written from the received buffers.
            move |r| extract_lent(r, &target, &ExtractOptions::default()),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.files, 51);
    assert!(std::fs::read(dst.join("data/app/big.bin")).unwrap() == pattern(11 * MIB, 5));
    assert_eq!(
        std::fs::read_to_string(dst.join("data/app/f7")).unwrap(),
        "file 7"
    );
}

/// The whole of `key` through a streamed, ranged download.
async fn read_streamed(store: &ObjectStore, key: &str) -> Vec<u8> {
    let mut reader = store
        .download_to_reader(BUCKET, key, u64::MAX)
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        all
    })
    .await
    .unwrap()
}

/// MD5 of `data` in hex, as S3 gives a single PUT's ETag.
fn md5_hex(data: &[u8]) -> String {
    use s3s::crypto::{Checksum, Md5};
    let mut md5 = Md5::new();
    md5.update(data);
    md5.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn unquoted(etag: Option<String>) -> String {
    etag.unwrap_or_default().trim_matches('"').to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_put_in_the_directory_by_hand_are_served_with_their_md5() {
    let f = fixture().await;
    let data = pattern(24 * MIB + 777, 9);
    let path = f.server.root().join(BUCKET).join("dropped/x.bin");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &data).unwrap();
    let info = f.store.head(BUCKET, "dropped/x.bin").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(unquoted(info.etag), md5_hex(&data));

    // Stored once, where the store's own ETags are kept: the next requests
    // answer with what is stored rather than hashing the file again.
    let info_file = std::fs::read_dir(f.server.root())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".internal.json"))
        .expect("stored etag");
    let stored = std::fs::read_to_string(&info_file).unwrap();
    std::fs::write(
        &info_file,
        stored.replace(&md5_hex(&data), "0123456789abcdef"),
    )
    .unwrap();
    let info = f.store.head(BUCKET, "dropped/x.bin").await.unwrap();
    assert_eq!(unquoted(info.etag), "0123456789abcdef");

    // Ranged, streamed reads return the file's bytes.
    let got = read_streamed(&f.store, "dropped/x.bin").await;
    assert!(got == data, "streamed bytes differ");

    // Replaced by hand: its new MD5.
    let data = pattern(3 * MIB, 10);
    std::fs::write(&path, &data).unwrap();
    let info = f.store.head(BUCKET, "dropped/x.bin").await.unwrap();
    assert_eq!(info.size, data.len() as u64);
    assert_eq!(unquoted(info.etag), md5_hex(&data));

    // Replaced by a multipart upload: the upload's ETag stands.
    let report = f
        .store
        .upload_with(BUCKET, "dropped/x.bin", |w| {
            w.write_all(&pattern(20 * MIB, 14))?;
            Ok(())
        })
        .await
        .unwrap();
    assert!(report.parts > 1);
    let info = f.store.head(BUCKET, "dropped/x.bin").await.unwrap();
    assert!(
        unquoted(info.etag.clone()).ends_with(&format!("-{}", report.parts)),
        "{info:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_replaced_during_a_download_fails_it_instead_of_mixing_versions() {
    let f = fixture().await;
    let old = pattern(40 * MIB, 11);
    f.store
        .put_bytes(BUCKET, "moving.tar", old.clone())
        .await
        .unwrap();
    let mut reader = f
        .store
        .download_to_reader(BUCKET, "moving.tar", u64::MAX)
        .await
        .unwrap();
    let mut first = vec![0u8; 1];
    let mut reader = tokio::task::spawn_blocking(move || {
        reader.read_exact(&mut first).unwrap();
        assert_eq!(first[0], old[0]);
        reader
    })
    .await
    .unwrap();
    // The download holds a few ranges at most; the later ones are asked
    // for after the object is replaced.
    f.store
        .put_bytes(BUCKET, "moving.tar", pattern(40 * MIB, 12))
        .await
        .unwrap();
    let err = tokio::task::spawn_blocking(move || {
        let mut rest = Vec::new();
        reader
            .read_to_end(&mut rest)
            .expect_err("a replaced object")
    })
    .await
    .unwrap();
    let typed = ObjectStoreError::from_io(&err).expect("typed error");
    assert!(
        matches!(typed, ObjectStoreError::Inconsistent { .. }),
        "{typed}"
    );
    assert!(typed.to_string().contains("replaced"), "{typed}");

    // A HEAD or GET naming the current ETag still succeeds.
    let etag = f.store.head(BUCKET, "moving.tar").await.unwrap().etag;
    let got = f
        .store
        .sdk()
        .get_object()
        .bucket(BUCKET)
        .key("moving.tar")
        .set_if_match(etag)
        .range("bytes=0-9")
        .send()
        .await
        .expect("current etag");
    assert_eq!(got.content_length(), Some(10));
}

/// Drops `path`'s pages from the page cache, then reads `len` bytes from
/// its start back into it without readahead: the store then serves a
/// cached head, a piece partly cached and uncached pieces.
fn cache_only_head(path: &std::path::Path, len: usize) {
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: advice on an open descriptor.
    unsafe {
        assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED), 0);
        assert_eq!(libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_RANDOM), 0);
    }
    let mut head = vec![0u8; len];
    f.read_exact(&mut head).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_partly_in_the_page_cache_are_served_whole() {
    let f = fixture().await;
    let data = pattern(13 * MIB + 5, 21);
    let path = f.server.root().join(BUCKET).join("cold.bin");
    std::fs::write(&path, &data).unwrap();
    // The ETag first (it reads the whole file into the cache).
    f.store.head(BUCKET, "cold.bin").await.unwrap();

    cache_only_head(&path, 5 * MIB + 1234);
    let got = f
        .store
        .get_bytes(BUCKET, "cold.bin", u64::MAX)
        .await
        .unwrap();
    assert!(got == data, "whole object differs");

    cache_only_head(&path, 3 * MIB + 99);
    let got = read_streamed(&f.store, "cold.bin").await;
    assert!(got == data, "ranged reads differ");
}

/// A TCP proxy in front of the store (a double of the network between the
/// agent and its store, nothing of ours). With `cut_after`, the first
/// response to pass that many bytes is cut off there (both directions
/// closed), once; with `hold_from`, a request for a range starting at or
/// past that offset is held (nothing forwarded) while its client keeps the
/// connection, counted in `held`; with `lose_answer_to`, the answer to the
/// first request whose text (lowercased) holds it is lost: the request
/// reaches the store, the connection closes before its answer.
struct Proxy {
    url: String,
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

async fn proxy(store: &str, cut_after: Option<u64>, hold_from: Option<u64>) -> Proxy {
    proxy_losing(store, cut_after, hold_from, None).await
}

async fn proxy_losing(
    store: &str,
    cut_after: Option<u64>,
    hold_from: Option<u64>,
    lose_answer_to: Option<&'static str>,
) -> Proxy {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = store.trim_start_matches("http://").to_string();
    let (cuts, held) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (cuts2, held2) = (cuts.clone(), held.clone());
    let cut_done = Arc::new(AtomicBool::new(false));
    let lost_one = Arc::new(AtomicBool::new(false));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&store).await else {
                continue;
            };
            let (cuts, held, cut_done) = (cuts2.clone(), held2.clone(), cut_done.clone());
            let lost_one = lost_one.clone();
            let lose_here = Arc::new(AtomicBool::new(false));
            let lose = lose_here.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let down = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut sent = 0u64;
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if lose.load(Ordering::SeqCst) {
                            // The answer goes nowhere; the client's
                            // connection closes.
                            return;
                        }
                        if let Some(limit) = cut_after {
                            if sent + n as u64 > limit && !cut_done.swap(true, Ordering::SeqCst) {
                                let _ = cw.write_all(&buf[..(limit - sent) as usize]).await;
                                cuts.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        sent += n as u64;
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    if lose_answer_to.is_some_and(|p| text.contains(p))
                        && !lost_one.swap(true, Ordering::SeqCst)
                    {
                        lose_here.store(true, Ordering::SeqCst);
                    }
                    let hold = hold_from.is_some_and(|from| {
                        text.split("range: bytes=").skip(1).any(|rest| {
                            rest.split('-')
                                .next()
                                .and_then(|s| s.parse::<u64>().ok())
                                .is_some_and(|start| start >= from)
                        })
                    });
                    if hold {
                        held.fetch_add(1, Ordering::SeqCst);
                        // Until the client lets go of the connection.
                        while matches!(cr.read(&mut buf).await, Ok(n) if n > 0) {}
                        held.fetch_sub(1, Ordering::SeqCst);
                        break;
                    }
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                down.abort();
            });
        }
    });
    Proxy { url, cuts, held }
}

/// A connection that breaks off in the middle of a range's body costs that
/// range another GET, not the download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_cut_off_mid_body_is_fetched_again() {
    let f = fixture().await;
    let data = pattern(12 * MIB + 777, 5);
    f.store
        .put_bytes(BUCKET, "cut.bin", data.clone())
        .await
        .unwrap();
    let p = proxy(&f.server.endpoint(), Some(MIB as u64), None).await;
    let store = ObjectStore::new(&ObjectStoreConfig::local(&p.url, AK, SK)).unwrap();
    let got = read_streamed(&store, "cut.bin").await;
    assert_eq!(p.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(got == data, "bytes differ after a range was fetched again");
}

/// A download given up (its reader dropped, as after a bad archive) stops
/// the GETs it still had running instead of leaving them to their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_download_stops_its_requests() {
    use std::sync::atomic::Ordering;
    let f = fixture().await;
    let data = pattern(16 * MIB, 6);
    f.store
        .put_bytes(BUCKET, "held.bin", data.clone())
        .await
        .unwrap();
    let range = ObjectStoreConfig::default().transfer.range_bytes as u64;
    let p = proxy(&f.server.endpoint(), None, Some(range)).await;
    let store = ObjectStore::new(&ObjectStoreConfig::local(&p.url, AK, SK)).unwrap();
    let mut reader = store
        .download_to_reader(BUCKET, "held.bin", u64::MAX)
        .await
        .unwrap();
    let mut first = vec![0u8; 4096];
    let mut reader = tokio::task::spawn_blocking(move || {
        reader.read_exact(&mut first).unwrap();
        reader
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while p.held.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no range was held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = reader.read(&mut [0u8; 0]);
    drop(reader);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while p.held.load(Ordering::SeqCst) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} GETs still open after their download was dropped",
            p.held.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A multipart upload its writer could not end (its process killed in the
/// middle of an export) is noted while open, and ended from the note: its
/// parts stop taking room in the store. A writer that ends its upload
/// leaves no note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_left_open_is_ended_from_its_note() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let note = dir.path().join("job.upload");
    let part = ObjectStoreConfig::default().transfer.part_bytes;
    let mut w = f.store.writer(BUCKET, "left.bin").unwrap();
    w.note_upload_in(note.clone());
    tokio::task::spawn_blocking(move || {
        w.write_all(&pattern(part + 10, 9)).unwrap();
        // Lost with its upload open, as in a process killed.
        std::mem::forget(w);
    })
    .await
    .unwrap();
    let mut noted = None;
    for _ in 0..100 {
        noted = std::fs::read(&note)
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok());
        if noted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let noted = noted.expect("the open upload is noted");
    assert_eq!(noted["key"], "left.bin");
    let id = noted["upload_id"].as_str().unwrap().to_string();
    let parts = || {
        f.store
            .sdk()
            .list_parts()
            .bucket(BUCKET)
            .key("left.bin")
            .upload_id(&id)
            .send()
    };
    // Wait for its first part to be stored.
    for _ in 0..100 {
        if parts().await.is_ok_and(|p| !p.parts().is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        parts().await.is_ok_and(|p| !p.parts().is_empty()),
        "the upload holds its first part"
    );
    assert!(f.store.abort_noted(&note).await.unwrap());
    assert!(!note.exists(), "the note outlived its upload");
    assert!(parts().await.is_err(), "the upload is still open");
    assert!(
        !f.store.abort_noted(&note).await.unwrap(),
        "no note, nothing to do"
    );

    // Ended by its writer: no note left.
    let mut w = f.store.writer(BUCKET, "done.bin").unwrap();
    w.note_upload_in(note.clone());
    tokio::task::spawn_blocking(move || {
        w.write_all(&pattern(part + 10, 10)).unwrap();
        w.finish().unwrap();
    })
    .await
    .unwrap();
    assert!(!note.exists());
}

/// A multipart upload whose completion was stored but whose answer was lost
/// is a success: the retry finds the upload gone and the object whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_answer_was_lost_is_a_success() {
    let f = fixture().await;
    let p = proxy_losing(
        &f.server.endpoint(),
        None,
        None,
        Some("post /push-bucket/lost.bin?uploadid="),
    )
    .await;
    let store = ObjectStore::new(&ObjectStoreConfig::local(&p.url, AK, SK)).unwrap();
    let data = pattern(10 * MIB + 5, 11);
    let payload = data.clone();
    let report = store
        .upload_with(BUCKET, "lost.bin", move |w| w.write_all(&payload))
        .await
        .unwrap();
    assert_eq!(report.parts, 2);
    let got = f
        .store
        .get_bytes(BUCKET, "lost.bin", u64::MAX)
        .await
        .unwrap();
    assert!(got[..] == data[..], "stored bytes differ");
}
