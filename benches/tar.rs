//! The tar hot path: the same archives extracted by our extractor and by GNU
//! `tar -xf` onto the same filesystem, each run ending with a filesystem
//! sync (`syncfs` for ours, `sync -f` after GNU tar). Shapes: many small
//! files, a few large files, a mix. Writes `target/bench-report/tar.json`
//! with time ratios ours / GNU tar (target <= 0.8), each side its fastest
//! sample (see [`fastest`]), and the ratio of the median round: samples are
//! taken in rounds, one run of each extractor per round, so each ratio
//! compares runs minutes apart at most (see `main`).
//!
//! Both keep ownership and modification times (GNU tar as root keeps
//! owners by default; ours with `Ownership::Archive`). Every run starts from
//! the same page cache: dropped, then the inputs read back (see [`settle`]).
//!
//! Ours also runs streamed from the embedded S3 store on loopback (ranged
//! GETs in flight while the extractor writes large files from the received
//! buffers, as the agent's push does), reported against ours from
//! the local file (target: within 15%). For scale, ours also extracts the
//! archive sent over one plain loopback TCP connection (a thread reading
//! the file and writing it to the socket, no HTTP): what any network
//! stream costs on this host before the object store protocol adds its
//! share. And the same download taken into nothing: the stream's own cost.
//! Each run's CPU time (user + system: this process, its children and the
//! store, which runs in a process of its own as the agent's does) is
//! reported next to its wall time, since on a host with few cores the
//! store, the client and the extractor of a streamed run share them; the
//! streamed run is also reported against the least it could take here,
//! the download's CPU and the local extraction's spread over every core
//! (`_streamed_vs_cpu_bound_time`).
//! The process keeps the agent's allocator settings
//! (`cph_agent::memory`). `CPH_TAR_BENCH_SHAPES=small,large` limits the run
//! to the shapes whose names start so.
//!
//! The extractions land on the filesystem of the build (`target/`), or,
//! with `CPH_TAR_BENCH_FS=btrfs` (as root), in a subvolume of a btrfs pool
//! made with the agent's own commands on a loop file (a sparse file on a
//! loop device doing direct I/O, formatted and mounted as the agent does;
//! without the agent's simple quotas): where a push lands on a host whose
//! phones live on btrfs volumes (with the overlay backend, `cph up`'s
//! default, it lands on the host's own filesystem).
//! That run writes `target/bench-report/tar_btrfs.json`. With
//! `CPH_TAR_BENCH_FS=ext4` they land on an ext4 made with `mkfs.ext4`'s
//! defaults (a journal, as a host's own filesystem has) on a loop file the
//! same way, and the run writes `target/bench-report/tar_ext4.json`: the
//! build's filesystem on these VMs is an ext4 without a journal, where the
//! kernel treats freed inodes differently (see [`settle`]).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cph_runtime::archive::{extract, extract_lent, ExtractOptions, Ownership};
use cph_runtime::storage::btrfs::{pool_mount, POOL_LABEL};
use cph_runtime::storage::cmd::{self, Btrfs, Invocation, Losetup, Runner, SystemRunner};
use criterion::{Criterion, SamplingMode};

#[path = "common/report.rs"]
mod report;
use report::Metric;

struct Shape {
    name: &'static str,
    small_files: usize,
    large_files: usize,
    large_size: usize,
}

fn build(path: &Path, shape: &Shape) {
    let out = BufWriter::with_capacity(1 << 20, File::create(path).expect("create archive"));
    let mut b = tar::Builder::new(out);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let dirs = (shape.small_files / 100).max(1);
    for d in 0..dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_data(&mut h, format!("d{d:04}"), std::io::empty())
            .expect("dir");
    }
    let mut data = vec![0u8; 16 * 1024];
    for i in 0..shape.small_files {
        // 512 B to 8 KiB, like app data and config trees.
        let size = 512 + (next() % (8 * 1024 - 512)) as usize;
        for (j, b) in data[..size].iter_mut().enumerate() {
            *b = (i + j) as u8;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(size as u64);
        b.append_data(&mut h, format!("d{:04}/f{i:06}", i % dirs), &data[..size])
            .expect("file");
    }
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    for i in 0..shape.large_files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_600_000_000);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(shape.large_size as u64);
        let body = Repeat {
            chunk: &chunk,
            left: shape.large_size,
            pos: 0,
        };
        b.append_data(&mut h, format!("large{i}.bin"), body)
            .expect("large file");
    }
    b.into_inner().expect("finish archive");
}

/// A reader yielding `left` bytes of `chunk`, repeated.
struct Repeat<'a> {
    chunk: &'a [u8],
    left: usize,
    pos: usize,
}

impl std::io::Read for Repeat<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left).min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos = (self.pos + n) % self.chunk.len();
        self.left -= n;
        Ok(n)
    }
}

/// Ours as every run of the bench uses it: archive owners and a final
/// sync, like GNU tar as root followed by `sync -f`.
fn bench_opts() -> ExtractOptions {
    ExtractOptions {
        sync: true,
        ownership: Ownership::Archive,
        ..Default::default()
    }
}

fn ours(archive: &Path, dest: &Path) {
    std::fs::create_dir(dest).expect("dest");
    let opts = bench_opts();
    let f = File::open(archive).expect("open archive");
    extract(f, dest, &opts).expect("extract");
}

fn gnu(archive: &Path, dest: &Path) {
    std::fs::create_dir(dest).expect("dest");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dest)
        .status()
        .expect("run tar");
    assert!(st.success(), "gnu tar failed");
    let st = Command::new("sync")
        .arg("-f")
        .arg(dest)
        .status()
        .expect("run sync");
    assert!(st.success(), "sync failed");
}

/// Ours reading the archive from a loopback TCP connection fed by a thread
/// that reads the file in 1 MiB pieces.
fn ours_tcp(archive: &Path, dest: &Path) {
    use std::io::{Read, Write};
    std::fs::create_dir(dest).expect("dest");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let path = archive.to_path_buf();
    let sender = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        let mut f = File::open(&path).expect("open archive");
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).expect("read archive");
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).expect("send");
        }
    });
    let sock = std::net::TcpStream::connect(addr).expect("connect");
    let opts = bench_opts();
    extract(sock, dest, &opts).expect("extract from tcp");
    sender.join().expect("sender thread");
}

/// The embedded S3 store on loopback holding the bench's archives, and a
/// client of it. The store runs in a process of its own (this executable,
/// [`SERVE`]), as the agent's store is never in the agent's process (`cph
/// up` runs it as `cph-agent object-store`; in production it is OBS); a
/// peak-memory probe connects to it from a third ([`Store::connect`]).
struct Store {
    rt: tokio::runtime::Runtime,
    client: cph_agent::objstore::ObjectStore,
    server: Option<StoreProcess>,
}

const BUCKET: &str = "tar-bench";
const STORE_AK: &str = "bench-ak";
const STORE_SK: &str = "bench-sk-0123456789";

/// The argument that makes this executable the bench's store:
/// `--serve-store ROOT` serves ROOT on a loopback port, prints its
/// endpoint on a line of its own and serves until its stdin closes.
const SERVE: &str = "--serve-store";

/// Serves the store in this process (see [`SERVE`]).
fn serve_store(root: &Path) {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let server = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        cph_agent::objstore::serve(root.to_path_buf(), l, STORE_AK.into(), STORE_SK.into())
            .await
            .expect("embedded store")
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", server.endpoint()).expect("print endpoint");
    out.flush().expect("print endpoint");
    // Until the bench closes its end (or dies).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(server);
}

/// The store's process, stopped when dropped (also on a panic).
struct StoreProcess {
    child: std::process::Child,
    endpoint: String,
}

impl StoreProcess {
    fn start(root: &Path) -> StoreProcess {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = Command::new(std::env::current_exe().expect("bench executable"))
            .arg(SERVE)
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the store");
        let mut line = String::new();
        let out = child.stdout.take().expect("store stdout");
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("store endpoint");
        assert!(line.starts_with("http://"), "store said {line:?}");
        StoreProcess {
            child,
            endpoint: line.trim().to_string(),
        }
    }

    /// The CPU time (user + system) the store has taken so far: it is not
    /// waited for until the bench ends, so `RUSAGE_CHILDREN` does not have
    /// it yet.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("store's /proc stat");
        // Fields after the command's closing parenthesis, from the third:
        // utime and stime are the 14th and 15th.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().expect("stat field"))
            .collect();
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_micros((f[0] + f[1]) * 1_000_000 / hz)
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

impl Store {
    fn start(root: &Path) -> Store {
        let server = StoreProcess::start(root);
        let rt = tokio::runtime::Runtime::new().expect("tokio");
        let mut store = Store::connect(rt, &server.endpoint);
        store
            .rt
            .block_on(store.client.create_bucket(BUCKET))
            .expect("bucket");
        store.server = Some(server);
        store
    }

    /// A client of the store at `endpoint`, as the agent is of its store.
    fn connect(rt: tokio::runtime::Runtime, endpoint: &str) -> Store {
        let config = cph_agent::objstore::ObjectStoreConfig::local(endpoint, STORE_AK, STORE_SK);
        let client = cph_agent::objstore::ObjectStore::new(&config).expect("client");
        Store {
            rt,
            client,
            server: None,
        }
    }

    /// The store this bench started.
    fn process(&self) -> &StoreProcess {
        self.server.as_ref().expect("a store this bench started")
    }

    /// CPU time (user + system) of this process, of its waited-for
    /// children (GNU tar, `sync`) and of the store so far.
    fn cpu_time(&self) -> Duration {
        cpu_time() + self.process().cpu()
    }

    /// Uploads `file` as `key` (multipart for large archives).
    fn put(&self, key: &str, file: &Path) {
        let _g = self.rt.enter();
        let mut w = self.client.writer(BUCKET, key).expect("writer");
        let mut f = File::open(file).expect("open archive");
        std::io::copy(&mut f, &mut w).expect("upload");
        w.finish().expect("finish upload");
    }

    /// Starts the streaming download of `key`.
    fn reader(&self, key: &str) -> cph_agent::objstore::ObjectReader {
        self.rt
            .block_on(self.client.download_to_reader(BUCKET, key, u64::MAX))
            .expect("download")
    }

    /// Takes `key` through the same streaming download into nothing, as a
    /// push's extraction takes it (lent, not copied into a buffer of its
    /// own): what the stream alone costs.
    fn download(&self, key: &str) {
        use cph_runtime::archive::Lend;
        let mut reader = self.reader(key);
        while !reader.lend(1 << 20).expect("read download").is_empty() {}
    }

    /// Extracts `key` into `dest` while it downloads.
    fn extract(&self, key: &str, dest: &Path) {
        std::fs::create_dir(dest).expect("dest");
        let opts = bench_opts();
        extract_lent(self.reader(key), dest, &opts).expect("extract streamed");
    }
}

/// CPU time (user + system) of this process and of its waited-for
/// children so far.
fn cpu_time() -> Duration {
    let usage = |who| {
        // SAFETY: getrusage only writes the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::getrusage(who, &mut ru) };
        assert_eq!(rc, 0, "getrusage");
        let t = |tv: libc::timeval| {
            Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
        };
        t(ru.ru_utime) + t(ru.ru_stime)
    };
    usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN)
}

/// Runs of each extractor per shape that are reported (after one more
/// that warms up).
const SAMPLES: usize = 10;

/// Criterion's warm-up time, and the measurement time it is asked for
/// (the runs take far longer: one run per sample).
const WARM_UP: Duration = Duration::from_millis(1);

/// One timed run: wall time and the CPU time it took.
#[derive(Clone, Copy, Default)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// The argument that makes this executable a peak-memory probe (see
/// [`peak_rss_mib`]): `--peak-rss local ARCHIVE DEST` or
/// `--peak-rss streamed ENDPOINT KEY DEST`.
const PROBE: &str = "--peak-rss";

/// One extraction in this process, which is fresh: its peak resident memory
/// is that of the extraction. Streamed, the store is the bench's, in
/// another process, as the agent's store is never in the agent's process
/// (`cph up` runs it as `cph-agent object-store`; in production it is OBS).
fn probe(args: &[String]) {
    match args {
        [mode, archive, dest] if mode == "local" => ours(Path::new(archive), Path::new(dest)),
        [mode, endpoint, key, dest] if mode == "streamed" => {
            let rt = tokio::runtime::Runtime::new().expect("tokio");
            Store::connect(rt, endpoint).extract(key, Path::new(dest))
        }
        _ => panic!("usage: {PROBE} local ARCHIVE DEST | streamed ENDPOINT KEY DEST"),
    }
}

/// Runs `cmd` to its end and returns its peak resident memory in MiB: its
/// `VmHWM`, read every few milliseconds until it exits. (`ru_maxrss` from
/// `wait4` would not do: a spawned child keeps the spawner's peak across
/// `exec`.)
fn peak_rss_mib(cmd: &mut Command) -> f64 {
    let mut child = cmd.spawn().expect("spawn peak-memory probe");
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status) {
            let hwm = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kib = peak_kib.max(hwm.unwrap_or(0));
        }
        if let Some(st) = child.try_wait().expect("wait for probe") {
            assert!(st.success(), "{cmd:?} failed: {st}");
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    peak_kib as f64 / 1024.0
}

/// Puts the host's memory back in the same state before every run: the
/// page cache dropped (as root), then `inputs` read into it again. Without
/// it a run that follows others takes up to twice the time and CPU of one
/// on a fresh cache, whatever the extractor, and more with each run, so
/// whichever extractor ran later looked slower (100,000 small files:
/// 1.95-2.2 s settled, 3.5-5 s not). On ext4 without a journal (these VMs'
/// root filesystem) the cause is in the inode allocator: it skips inodes
/// freed in the last minute or so (longer while their inode table block
/// is dirty, as a new inode in the block makes it), which it recognises
/// from the inode table blocks it has cached, so after a run removed
/// 100,000 files the next run's creations step past them one by one, each
/// from the start of the directory's block group. Dropping the cache
/// shortens that walk without removing it: in a profile of a settled run
/// of ours it still took a sixth of the CPU, and half of it for 20,000
/// small files in 200 directories, where two writers allocating in one
/// group walked twice what one did (2.2-2.9 CPU-s against 1.5-1.7; GNU tar
/// 1.6-1.9). The kernel makes that check only when the filesystem has no
/// journal (`find_inode_bit`); `CPH_TAR_BENCH_FS=ext4` measures an ext4
/// with one.
fn settle(inputs: &[PathBuf]) {
    if std::fs::write("/proc/sys/vm/drop_caches", "1").is_err() {
        return;
    }
    for p in inputs {
        let mut f = File::open(p).expect("open input");
        std::io::copy(&mut f, &mut std::io::sink()).expect("read input");
    }
}

/// Removes what runs extracted, untimed, and waits for the filesystem to
/// be done with it, so that no run meets the work of an earlier one's
/// removal (whichever extractor it was): the removal committed (`sync -f`)
/// and, on a btrfs pool (`trim`), the space it freed discarded at once. The
/// pool discards freed space in the background otherwise (`discard=async`,
/// the default on devices that support it, as loop devices do), holes
/// punched in the pool's file over the next seconds: the 1 GB that 100,000
/// small files freed took 15 s, a `fstrim` 1.2 s.
fn clear(dests: &[PathBuf], root: &Path, trim: bool) {
    for dest in dests {
        std::fs::remove_dir_all(dest).expect("clean dest");
    }
    let status = Command::new("sync")
        .arg("-f")
        .arg(root)
        .status()
        .expect("run sync");
    assert!(status.success(), "sync -f {}: {status}", root.display());
    if trim {
        let status = Command::new("fstrim")
            .arg(root)
            .status()
            .expect("run fstrim");
        assert!(status.success(), "fstrim {}: {status}", root.display());
    }
}

/// Free page reporting held off while the bench runs, the former setting
/// put back when dropped (also on a panic). A VM whose balloon device
/// reports free pages hands memory the guest freed back to the host, and
/// the guest's next touch of it waits for the host to map it again: the
/// bench frees a run's page cache before every run, so some samples of
/// every extractor took 2-4 times as long (4 files of 256 MB: 0.58-1.37 s
/// against 0.33-0.40 with reporting held off, six runs each). Reporting
/// is held off by asking for blocks of an order larger than the largest
/// the allocator has; a kernel that refuses that keeps reporting, and the
/// bench says so. Bare-metal hosts have no balloon.
struct NoPageReporting {
    former: Option<String>,
}

impl NoPageReporting {
    const ORDER: &'static str = "/sys/module/page_reporting/parameters/page_reporting_order";

    fn start() -> NoPageReporting {
        let Ok(former) = std::fs::read_to_string(Self::ORDER) else {
            return NoPageReporting { former: None };
        };
        // x86_64 and arm64 allocators stop at order 10 (4 MiB blocks with 4 KiB pages).
        if let Err(e) = std::fs::write(Self::ORDER, "11") {
            eprintln!("tar bench: free page reporting stays on ({e}); expect slow samples");
            return NoPageReporting { former: None };
        }
        NoPageReporting {
            former: Some(former.trim().to_string()),
        }
    }
}

impl Drop for NoPageReporting {
    fn drop(&mut self) {
        if let Some(former) = &self.former {
            let _ = std::fs::write(Self::ORDER, former);
        }
    }
}

/// One way of extracting an archive into a new directory.
type Extractor<'a> = dyn Fn(&Path, &Path) + 'a;

/// The fastest sample. Where free page reporting cannot be held off (see
/// [`NoPageReporting`]) some samples of every extractor stall on first
/// touches of memory the host had taken back, which makes the samples
/// bimodal and a median land on either mode; a stall only ever adds time,
/// so the fastest run is what the code itself costs. Criterion's own
/// report still shows every sample.
fn fastest(v: &[Sample]) -> Sample {
    v.iter().copied().min_by_key(|s| s.wall).unwrap_or_default()
}

fn main() {
    // As the agent process does.
    cph_agent::memory::keep_transfer_buffers();
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == PROBE) {
        probe(&args[at + 1..]);
        return;
    }
    if let Some(at) = args.iter().position(|a| a == SERVE) {
        serve_store(Path::new(
            args.get(at + 1).expect("usage: --serve-store ROOT"),
        ));
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    if Command::new("tar").arg("--version").output().is_err() {
        eprintln!("skipping tar bench: GNU tar not installed");
        return;
    }
    let shapes = if full {
        vec![
            Shape {
                name: "small_100k",
                small_files: 100_000,
                large_files: 0,
                large_size: 0,
            },
            Shape {
                name: "large_4x256m",
                small_files: 0,
                large_files: 4,
                large_size: 256 << 20,
            },
            Shape {
                name: "mix_20k_plus_8x32m",
                small_files: 20_000,
                large_files: 8,
                large_size: 32 << 20,
            },
        ]
    } else {
        vec![
            Shape {
                name: "small_500",
                small_files: 500,
                large_files: 0,
                large_size: 0,
            },
            Shape {
                name: "mix_200_plus_2x4m",
                small_files: 200,
                large_files: 2,
                large_size: 4 << 20,
            },
        ]
    };
    // Flat sampling: one extraction per sample (linear sampling would run
    // 55 extractions of 100,000 files per extractor).
    // `CPH_TAR_BENCH_SHAPES=large,mix` runs only the shapes named.
    let only = std::env::var("CPH_TAR_BENCH_SHAPES").ok();
    let shapes: Vec<Shape> = shapes
        .into_iter()
        .filter(|s| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|w| s.name.starts_with(w)))
        })
        .collect();
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(WARM_UP)
        .measurement_time(WARM_UP);
    if full {
        c = c.configure_from_args();
    }
    // Archives and extractions on the same filesystem, next to the build.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&base).expect("target dir");
    let dir = tempfile::Builder::new()
        .prefix("tar-bench-")
        .tempdir_in(&base)
        .expect("tempdir");
    let _no_reporting = NoPageReporting::start();
    let store = Store::start(&dir.path().join("objects"));
    // Where extractions land: next to the archives, or a loop filesystem.
    let pool = match std::env::var("CPH_TAR_BENCH_FS").as_deref() {
        Ok("btrfs") => Some(Pool::make(&dir.path().join("pool"), PoolFs::Btrfs)),
        Ok("ext4") => Some(Pool::make(&dir.path().join("pool"), PoolFs::Ext4)),
        Ok("") | Err(_) => None,
        Ok(other) => panic!("CPH_TAR_BENCH_FS={other}: btrfs and ext4 are known"),
    };
    let root: PathBuf = pool
        .as_ref()
        .map_or_else(|| dir.path().to_path_buf(), |p| p.root.clone());
    let trim = pool.as_ref().is_some_and(|p| p.fs == PoolFs::Btrfs);
    let mut metrics = Vec::new();
    for shape in &shapes {
        let archive = dir.path().join(format!("{}.tar", shape.name));
        build(&archive, shape);
        let key = format!("{}.tar", shape.name);
        store.put(&key, &archive);
        let streamed = |_: &Path, dest: &Path| store.extract(&key, dest);
        let download_only = |_: &Path, dest: &Path| {
            std::fs::create_dir(dest).expect("dest");
            store.download(&key);
        };
        let runs: [(&str, &Extractor); 5] = [
            ("ours", &ours),
            ("gnu_tar", &gnu),
            ("ours_streamed", &streamed),
            ("ours_plain_tcp", &ours_tcp),
            ("download_only", &download_only),
        ];
        // What every run reads: the archive, and the store's copy of it.
        let inputs = [
            archive.clone(),
            dir.path().join("objects").join(BUCKET).join(&key),
        ];
        assert!(inputs[1].is_file(), "the store keeps objects elsewhere");
        settle(&inputs);
        let counter = Cell::new(0u64);
        // One run of extractor `i` into a new directory, then that removed
        // and the host settled for whichever run is next.
        let measure = |i: usize| {
            let (label, run) = runs[i];
            counter.set(counter.get() + 1);
            let dest = root.join(format!("x-{label}-{}", counter.get()));
            let c = store.cpu_time();
            let t = Instant::now();
            run(&archive, &dest);
            let wall = t.elapsed();
            let cpu = store.cpu_time().saturating_sub(c);
            clear(&[dest], &root, trim);
            settle(&inputs);
            Sample { wall, cpu }
        };
        // Rounds of one run of each extractor, each round starting with the
        // next one, so that a host whose speed drifts over the minutes a
        // shape takes (these VMs' does, by a quarter and more) slows every
        // extractor alike rather than whichever had its runs then.
        let mut rounds: Vec<Vec<Sample>> = Vec::new();
        for round in 0..=SAMPLES {
            let mut this = vec![Sample::default(); runs.len()];
            for k in 0..runs.len() {
                let i = (round + k) % runs.len();
                this[i] = measure(i);
            }
            rounds.push(this);
        }
        // Extractor `i`'s runs, in their order.
        let runs_of = |rounds: &[Vec<Sample>], i: usize| -> Vec<Sample> {
            rounds.iter().map(|r| r[i]).collect()
        };
        let queued: Vec<VecDeque<Sample>> = (0..runs.len())
            .map(|i| runs_of(&rounds, i).into())
            .collect();
        // The first round is criterion's warm-up. It is left out: the
        // first extractor would have it right after the archive was
        // written, on memory the host has not reclaimed yet.
        let rounds = &rounds[1..];
        // Criterion is handed the same runs in their order. Its warm-up
        // goes by the clock: it calls again, with twice the iterations,
        // until its calls have taken `warm_up_time`, so the first call
        // takes that long before it hands over the warm-up round's run;
        // then each sample takes one run (flat sampling, with the calls
        // far longer than the measurement time asked). The queue so holds
        // exactly what criterion asks for; should it ask for more, those
        // are measured then.
        let queued = RefCell::new(queued);
        let mut g = c.benchmark_group(format!("tar/{}", shape.name));
        g.sampling_mode(SamplingMode::Flat);
        for (i, (label, _)) in runs.iter().enumerate() {
            let mut warming = true;
            g.bench_function(*label, |b| {
                b.iter_custom(|iters| {
                    if std::mem::take(&mut warming) {
                        std::thread::sleep(WARM_UP * 2);
                    }
                    (0..iters)
                        .map(|_| {
                            let next = queued.borrow_mut()[i].pop_front();
                            next.unwrap_or_else(|| {
                                eprintln!("tar bench: {label} measured outside the rounds");
                                measure(i)
                            })
                            .wall
                        })
                        .sum()
                })
            });
        }
        g.finish();
        // Peak memory, each extraction in a process of its own.
        let exe = std::env::current_exe().expect("bench executable");
        let dest = |what: &str| root.join(format!("peak-{what}-{}", shape.name));
        let mut local_cmd = Command::new(&exe);
        local_cmd
            .arg(PROBE)
            .arg("local")
            .arg(&archive)
            .arg(dest("ours"));
        let mut streamed_cmd = Command::new(&exe);
        streamed_cmd
            .arg(PROBE)
            .arg("streamed")
            .arg(&store.process().endpoint)
            .arg(&key)
            .arg(dest("streamed"));
        std::fs::create_dir(dest("gnu")).expect("dest");
        let mut gnu_cmd = Command::new("tar");
        gnu_cmd.arg("-xf").arg(&archive).arg("-C").arg(dest("gnu"));
        let rss = [&mut local_cmd, &mut streamed_cmd, &mut gnu_cmd].map(peak_rss_mib);
        // The next shape's first runs must not meet these removals' work.
        clear(&["ours", "streamed", "gnu"].map(dest), &root, trim);
        let [local, gnu_tar, streamed, tcp, download] =
            [0, 1, 2, 3, 4].map(|i| fastest(&runs_of(rounds, i)));
        // The round whose ratio of ours to GNU tar is the median: a
        // comparison of runs minutes apart at most, whatever the drift.
        let mut by_ratio: Vec<&Vec<Sample>> = rounds.iter().collect();
        by_ratio.sort_by(|a, b| {
            let r = |x: &Vec<Sample>| x[0].wall.as_secs_f64() / x[1].wall.as_secs_f64();
            r(a).total_cmp(&r(b))
        });
        let median = by_ratio[by_ratio.len() / 2];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        // The least a streamed run can take on this host: the download's
        // CPU (the store's and the client's, in two processes) and the
        // extraction's, spread over every core without a gap.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let streamed_bound = (download.cpu + local.cpu) / cores;
        // (what, ours, anchor, unit): ours vs GNU tar, then the streamed
        // runs; then the CPU the fastest samples took, which bounds the
        // streamed run on a host with few cores (the store, the client and
        // the extractor share them).
        let pairs = [
            ("_time", local.wall, gnu_tar.wall),
            ("_median_round_time", median[0].wall, median[1].wall),
            ("_streamed_vs_local_time", streamed.wall, local.wall),
            ("_plain_tcp_vs_local_time", tcp.wall, local.wall),
            ("_streamed_vs_plain_tcp_time", streamed.wall, tcp.wall),
            ("_download_only_vs_local_time", download.wall, local.wall),
            ("_streamed_vs_cpu_bound_time", streamed.wall, streamed_bound),
            ("_cpu", local.cpu, gnu_tar.cpu),
            ("_streamed_vs_local_cpu", streamed.cpu, local.cpu),
            ("_download_only_vs_local_cpu", download.cpu, local.cpu),
        ];
        for (what, ours, anchor) in pairs {
            metrics.push(Metric {
                metric: format!("extract_{}{what}", shape.name),
                ours: ms(ours),
                anchor: ms(anchor),
                unit: if what.ends_with("_cpu") {
                    "cpu_ms"
                } else {
                    "ms"
                },
            });
        }
        // Target: under 64 MiB; GNU tar's own peak for scale.
        for (what, ours) in [("", rss[0]), ("_streamed", rss[1])] {
            metrics.push(Metric {
                metric: format!("extract_{}{what}_peak_rss", shape.name),
                ours,
                anchor: rss[2],
                unit: "MiB",
            });
        }
        std::fs::remove_file(&archive).expect("remove archive");
    }
    c.final_summary();
    if !full {
        eprintln!(
            "tar smoke run done ({} metrics); no report written",
            metrics.len()
        );
        for m in &metrics {
            eprintln!(
                "{}: ours {:.1} {unit}, anchor {:.1} {unit}",
                m.metric,
                m.ours,
                m.anchor,
                unit = m.unit
            );
        }
        return;
    }
    let name = match pool.as_ref().map(|p| p.fs) {
        None => "tar",
        Some(PoolFs::Btrfs) => "tar_btrfs",
        Some(PoolFs::Ext4) => "tar_ext4",
    };
    report::write(name, &metrics);
}

/// A filesystem on a loop file with a directory to extract into; removed
/// when dropped, also on a panic.
struct Pool {
    fs: PoolFs,
    image: PathBuf,
    mount: PathBuf,
    device: String,
    root: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PoolFs {
    /// A btrfs pool as the agent makes one, extracted into a subvolume (a
    /// phone's).
    Btrfs,
    /// `mkfs.ext4`'s defaults, extracted into a directory.
    Ext4,
}

impl Pool {
    fn make(base: &Path, fs: PoolFs) -> Pool {
        let run = |inv: Invocation| SystemRunner.run(&inv).expect("pool command");
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let image = base.with_extension("img");
        let mount = base.to_path_buf();
        // Sparse: only what the runs write takes space. The ext4 smaller,
        // as its inode tables are written whole at `mkfs` (below).
        let size = match fs {
            PoolFs::Btrfs => 256 << 30,
            PoolFs::Ext4 => 32 << 30,
        };
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("pool image");
        let attach = Losetup::Attach {
            file: text(&image),
            direct_io: true,
        };
        let device = run(attach.render()).trim().to_string();
        let pool = Pool {
            fs,
            image,
            mount,
            device,
            root: base.join("phone"),
        };
        std::fs::create_dir_all(&pool.mount).expect("pool mount point");
        match fs {
            PoolFs::Btrfs => {
                run(cmd::mkfs_btrfs(&pool.device, POOL_LABEL));
                run(pool_mount(&pool.device, &pool.mount).render());
                run(Btrfs::SubvolumeCreate {
                    path: text(&pool.root),
                }
                .render());
            }
            PoolFs::Ext4 => {
                // Inode tables and journal written now: left to the
                // kernel, they would be written in the background during
                // the first runs.
                let opts = "lazy_itable_init=0,lazy_journal_init=0";
                run(Invocation {
                    program: "mkfs.ext4",
                    args: ["-q", "-F", "-E", opts, &pool.device]
                        .map(String::from)
                        .into(),
                });
                run(cmd::Mount {
                    fstype: Some("ext4"),
                    options: Vec::new(),
                    source: pool.device.clone(),
                    target: text(&pool.mount),
                }
                .render());
                std::fs::create_dir(&pool.root).expect("ext4 root");
            }
        }
        pool
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = SystemRunner.run(&cmd::umount(&self.mount.to_string_lossy()));
        let detach = Losetup::Detach {
            device: self.device.clone(),
        };
        let _ = SystemRunner.run(&detach.render());
        let _ = std::fs::remove_file(&self.image);
    }
}
