//! Jobs that move data between the object store and phones: `push`,
//! `install`/`install-multiple`, `batch-storage` export, `batch-restore`,
//! whole-phone migration, and the sharepool's files and apps.
//!
//! Everything streams: a tar is extracted while it downloads (the safe
//! extractor of `cph_runtime::archive`, every path resolved beneath the
//! target) and an export is uploaded while it is written. An APK is the one
//! exception: it is staged in the agent's own directory (never reachable
//! from a phone), checked (a zip with an `AndroidManifest.xml` naming its
//! package), then placed in the phone through the same safe extractor and
//! installed with the image's package manager.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Cursor, Read, Seek};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use cph_runtime::archive::{self, ArchiveError, ExtractOptions, ExtractReport, Ownership};
use cph_runtime::storage::{
    capacity_report, list_share_dir, ShareListing, SharePaths, StorageError, PHONE_SHARE_APPS_DIR,
};

use super::jobs::JobContext;
use super::jobstore::path_list;
use super::phones::validate_properties;
use super::JobFailure;
use crate::apk;
use crate::objstore::{
    ObjectReader, ObjectStore, ObjectStoreError, ObjectUrl, APK_MAX_BYTES, PUSH_MAX_BYTES,
};
use crate::protocol::{
    image_written, ImageRef, ObjectRef, ShareApp, EXECUTE_MSG_MAX, IMAGE_BUCKET, INSTALL_FLAGS,
    MAX_APKS, MIGRATE_BUCKET,
};

/// Time an installation may take inside the phone.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Where an installation's APKs are placed inside the phone.
const INSTALL_DIR: &str = "data/local/tmp";
/// Name of an installation's directory in [`INSTALL_DIR`], before its tag.
const INSTALL_PREFIX: &str = "cph-install-";
/// Most levels of a leftover installation directory removed (only a
/// phone makes one deeper than its APKs).
const INSTALL_LEFTOVER_DEPTH: usize = 64;
/// What a whole-phone migration leaves out: the sharepool mounts (not the
/// phone's data) and the runtime's own per-boot files.
const MIGRATE_EXCLUDE: &[&str] = &["/data/media/share", "/dev", "/proc", "/sys", "/run"];

fn url(o: &ObjectRef) -> String {
    format!("obs://{}/{}", o.bucket, o.key)
}

fn store<'a>(ctx: &'a JobContext<'_>) -> Result<&'a ObjectStore, JobFailure> {
    ctx.store.ok_or_else(|| {
        JobFailure::new(
            "CPS.0003",
            "this agent has no object store configured ([object_store] in its config)",
        )
    })
}

/// A store failure as the reference reports it.
pub fn store_failure(e: &ObjectStoreError) -> JobFailure {
    match e {
        ObjectStoreError::NotFound { .. } | ObjectStoreError::NoSuchBucket { .. } => {
            JobFailure::new("CPS.0104", e.to_string())
        }
        ObjectStoreError::TooLarge { .. } | ObjectStoreError::InvalidUrl { .. } => {
            JobFailure::new("CPS.0118", e.to_string())
        }
        // Not a passing fault: the object cannot be read until the bucket's
        // owner lets this platform read it.
        ObjectStoreError::AccessDenied { bucket, .. } => JobFailure::new(
            "CPS.0104",
            format!("{e}; grant the platform's account read access to bucket {bucket}"),
        ),
        _ => JobFailure::internal(e.to_string()),
    }
}

/// An extraction failure: a store failure met while reading, a bad archive
/// (CPS.0119), or a host failure; says what was written before it.
fn archive_failure(object: &ObjectRef, e: &ArchiveError) -> JobFailure {
    let mut f = match e.root_cause() {
        ArchiveError::Read(io) => match ObjectStoreError::from_io(io) {
            Some(s) => store_failure(s),
            None => JobFailure::internal(format!("reading {}: {io}", url(object))),
        },
        c if e.is_bad_archive() => JobFailure::new(
            "CPS.0119",
            format!("{} is not a usable tar: {c}", url(object)),
        ),
        c @ (ArchiveError::Escape { .. }
        | ArchiveError::Refused { .. }
        | ArchiveError::TooLarge { .. }) => {
            JobFailure::new("CPS.0119", format!("{} refused: {c}", url(object)))
        }
        c => JobFailure::internal(format!("extracting {}: {c}", url(object))),
    };
    if let Some(written) = e.written().filter(|w| !w.is_empty()) {
        f.msg.push_str(&format!(
            "; {} paths were written before the failure",
            written.len()
        ));
        f.execute_msg = Some(path_list("written before the failure:", written.iter()));
    }
    f
}

/// Starts streaming `object` (at most `limit` bytes): a missing object, one
/// too large or a store out of reach fails here, before any byte is used.
fn open_download(
    ctx: &JobContext<'_>,
    object: &ObjectRef,
    limit: u64,
) -> Result<ObjectReader, JobFailure> {
    let store = store(ctx)?;
    ctx.handle
        .block_on(store.download_to_reader(&object.bucket, &object.key, limit))
        .map_err(|e| store_failure(&e))
}

/// Streams `object` (at most `limit` bytes) and extracts it beneath `target`.
fn download_extract(
    ctx: &JobContext<'_>,
    object: &ObjectRef,
    limit: u64,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, JobFailure> {
    let reader = open_download(ctx, object, limit)?;
    extract_from(reader, object, target, opts)
}

fn extract_from(
    mut reader: ObjectReader,
    object: &ObjectRef,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, JobFailure> {
    archive::extract_lent(&mut reader, target, opts).map_err(|e| archive_failure(object, &e))
}

fn extracted(verb: &str, object: &ObjectRef, r: &ExtractReport) -> String {
    format!(
        "{verb} {}: {} files, {} directories, {} links, {} bytes",
        url(object),
        r.files,
        r.dirs,
        r.symlinks + r.hardlinks,
        r.bytes
    )
}

/// Extraction into a phone's root; `journal` lists what it writes ahead
/// of writing it, for a kill to leave a trace ([`JobContext::journal`]).
fn phone_extract_options(journal: Option<&Path>) -> ExtractOptions {
    ExtractOptions {
        sync: true,
        ownership: Ownership::Archive,
        journal: journal.map(Path::to_path_buf),
        ..ExtractOptions::default()
    }
}

/// Most bytes an image archive may have.
const IMAGE_MAX_BYTES: u64 = 64 << 30;

/// Imports an `obs://` image from the store once (its tar streamed into the
/// image volume); other images are imported by the phone lifecycle itself.
pub fn fetch_image(ctx: &JobContext<'_>, image: &ImageRef) -> Result<(), JobFailure> {
    if !image.url.starts_with("obs://") || ctx.phones.has_image(&image.image_id)? {
        return Ok(());
    }
    let url = ObjectUrl::parse(&image.url)
        .map_err(|e| JobFailure::new("CPS.0166", format!("image {}: {e}", image.image_id)))?;
    let store = store(ctx)?;
    let reader = ctx
        .handle
        .block_on(store.download_to_reader(&url.bucket, &url.key, IMAGE_MAX_BYTES))
        .map_err(|e| match e {
            ObjectStoreError::NotFound { .. } | ObjectStoreError::NoSuchBucket { .. } => {
                JobFailure::new("CPS.0166", format!("image {}: {e}", image.image_id))
            }
            e => store_failure(&e),
        })?;
    ctx.phones.import_from(image, Box::new(reader))
}

/// `push`: the tar is extracted into the phone's root.
pub fn push(ctx: &JobContext<'_>, phone: &str, object: &ObjectRef) -> Result<String, JobFailure> {
    ctx.phones.require_running(phone)?;
    let root = ctx.phones.rootfs(phone)?;
    let opts = phone_extract_options(Some(ctx.journal));
    let report = download_extract(ctx, object, PUSH_MAX_BYTES, &root, &opts)?;
    Ok(extracted("pushed", object, &report))
}

/// An APK downloaded into the agent's staging directory and checked.
struct StagedApk {
    path: PathBuf,
    package: String,
    size: u64,
}

fn stage_apk(
    ctx: &JobContext<'_>,
    object: &ObjectRef,
    dir: &Path,
    index: usize,
) -> Result<StagedApk, JobFailure> {
    if !object.key.ends_with(".apk") {
        return Err(JobFailure::new(
            "CPS.0119",
            format!("{} does not end with .apk", url(object)),
        ));
    }
    let store = store(ctx)?;
    let mut reader = ctx
        .handle
        .block_on(store.download_to_reader(&object.bucket, &object.key, APK_MAX_BYTES))
        .map_err(|e| store_failure(&e))?;
    let path = dir.join(format!("{index}.apk"));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| JobFailure::internal(format!("create {}: {e}", path.display())))?;
    let size =
        io::copy(&mut reader, &mut file).map_err(|e| match ObjectStoreError::from_io(&e) {
            Some(s) => store_failure(s),
            None => JobFailure::internal(format!("downloading {}: {e}", url(object))),
        })?;
    file.rewind()
        .map_err(|e| JobFailure::internal(format!("rewind {}: {e}", path.display())))?;
    let package = apk::package_name(io::BufReader::new(&file))
        .map_err(|e| JobFailure::new("CPS.0119", format!("{} is not an APK: {e}", url(object))))?;
    Ok(StagedApk {
        path,
        package,
        size,
    })
}

/// A one-file tar stream: `name` holding `size` bytes from `data`.
fn single_file_tar<R: Read>(name: &str, size: u64, mode: u32, data: R) -> io::Result<impl Read> {
    let mut header = tar::Header::new_gnu();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let pad = (512 - (size % 512) as usize) % 512;
    let mut tail = vec![0u8; pad];
    tail.extend_from_slice(&[0u8; 1024]);
    Ok(Cursor::new(header.as_bytes().to_vec())
        .chain(data.take(size))
        .chain(Cursor::new(tail)))
}

/// Removes the agent's staging directory when the job ends.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "staging directory not removed");
        }
    }
}

/// `install` / `install-multiple`: the APKs are downloaded, checked, placed
/// in the phone and installed with `pm` and the given flags.
pub fn install(
    ctx: &JobContext<'_>,
    job_id: &str,
    phone: &str,
    flags: &[String],
    objects: &[ObjectRef],
) -> Result<String, JobFailure> {
    if let Some(bad) = flags.iter().find(|f| !INSTALL_FLAGS.contains(&f.as_str())) {
        return Err(JobFailure::new(
            "CPS.0118",
            format!(
                "install option {bad} is not supported (allowed: {})",
                INSTALL_FLAGS.join(" ")
            ),
        ));
    }
    if objects.is_empty() || objects.len() > MAX_APKS {
        return Err(JobFailure::new(
            "CPS.0118",
            format!(
                "an installation takes 1 to {MAX_APKS} APKs, not {}",
                objects.len()
            ),
        ));
    }
    ctx.phones.require_running(phone)?;
    let tag: String = job_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    let staging = ctx.staging_dir.join(format!("install-{tag}"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)
        .map_err(|e| JobFailure::internal(format!("create {}: {e}", staging.display())))?;
    let _cleanup = Staging(staging.clone());
    let mut apks = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        apks.push(stage_apk(ctx, o, &staging, i)?);
    }
    let package = apks[0].package.clone();
    if let Some(other) = apks.iter().find(|a| a.package != package) {
        return Err(JobFailure::new(
            "CPS.0118",
            format!(
                "install-multiple takes the APKs of one application: {} and {} differ",
                package, other.package
            ),
        ));
    }

    // Into the phone beneath its root, through the extractor. A kill
    // before the removal below leaves it, removed at the agent's next start
    // ([`remove_install_leftovers`]).
    let in_phone = format!("{INSTALL_DIR}/{INSTALL_PREFIX}{tag}");
    let verb = if objects.len() > 1 {
        "install-multiple"
    } else {
        "install"
    };
    let place = || -> Result<Vec<String>, JobFailure> {
        let root = ctx.phones.rootfs(phone)?;
        let mut phone_paths = Vec::new();
        for (i, a) in apks.iter().enumerate() {
            let name = format!("{in_phone}/{i}.apk");
            let file = std::fs::File::open(&a.path)
                .map_err(|e| JobFailure::internal(format!("open {}: {e}", a.path.display())))?;
            let tar = single_file_tar(&name, a.size, 0o644, io::BufReader::new(file))
                .map_err(|e| JobFailure::internal(format!("apk entry {name}: {e}")))?;
            archive::extract(tar, &root, &ExtractOptions::default())
                .map_err(|e| archive_failure(&objects[i], &e))?;
            phone_paths.push(format!("/{name}"));
        }
        Ok(phone_paths)
    };
    let out = place().and_then(|phone_paths| {
        let mut argv: Vec<&str> = vec!["pm", verb];
        argv.extend(flags.iter().map(String::as_str));
        argv.extend(phone_paths.iter().map(String::as_str));
        ctx.phones
            .exec(phone, &argv, INSTALL_TIMEOUT, EXECUTE_MSG_MAX)
    });
    // Removed by the phone's own shell (the directory is the phone's to
    // change), also when placing an APK failed part way.
    let cleanup = format!("/{in_phone}");
    if let Err(e) = ctx.phones.exec(
        phone,
        &["rm", "-rf", cleanup.as_str()],
        Duration::from_secs(30),
        256,
    ) {
        tracing::warn!(phone, error = %e, "installation files left in the phone");
    }
    let out = out?;
    let text = output_text(&out);
    if out.timed_out {
        return Err(JobFailure::new(
            "CPS.0054",
            format!(
                "pm {verb} {package} did not finish in {} s",
                INSTALL_TIMEOUT.as_secs()
            ),
        ));
    }
    if out.exit_code != Some(0) || !text.contains("Success") {
        return Err(JobFailure {
            code: "CPS.0003".to_string(),
            msg: format!("pm {verb} {package} failed"),
            execute_msg: Some(text),
        });
    }
    Ok(format!("{package}: {text}"))
}

/// Removes the installation directories that jobs cut off by a kill left
/// in a phone's root (an installation removes its own when it ends); how
/// many. The phone may run and may have put links anywhere: nothing is
/// resolved through a link. Each directory down to [`INSTALL_DIR`] is
/// opened without following one (a link there leaves nothing to remove),
/// and a leftover's contents are removed through its directories'
/// descriptors, a link as a link.
pub(crate) fn remove_install_leftovers(root: &Path) -> Result<usize, JobFailure> {
    let dir_path = root.join(INSTALL_DIR);
    let fail = |what: &str, e: nix::Error| {
        JobFailure::internal(format!("{what} {}: {e}", dir_path.display()))
    };
    // The root is the agent's own path.
    let root_flags = BENEATH_DIR.difference(nix::fcntl::OFlag::O_NOFOLLOW);
    let mut dir = nix::dir::Dir::open(root, root_flags, nix::sys::stat::Mode::empty())
        .map_err(|e| fail("open", e))?;
    for name in INSTALL_DIR.split('/') {
        dir = match open_dir_at(&dir, name.as_ref()) {
            Ok(d) => d,
            Err(nix::Error::ENOENT | nix::Error::ENOTDIR | nix::Error::ELOOP) => return Ok(0),
            Err(e) => return Err(fail("open", e)),
        };
    }
    let leftovers: Vec<_> = dir_names(&mut dir)
        .map_err(|e| fail("list", e))?
        .into_iter()
        .filter(|n| n.as_encoded_bytes().starts_with(INSTALL_PREFIX.as_bytes()))
        .collect();
    for name in &leftovers {
        remove_tree_at(&dir, name, INSTALL_LEFTOVER_DEPTH)
            .map_err(|e| fail(&format!("remove {} in", name.to_string_lossy()), e))?;
    }
    Ok(leftovers.len())
}

/// Flags a directory is opened with beneath a phone's root: never through
/// a link.
const BENEATH_DIR: nix::fcntl::OFlag = nix::fcntl::OFlag::O_RDONLY
    .union(nix::fcntl::OFlag::O_DIRECTORY)
    .union(nix::fcntl::OFlag::O_NOFOLLOW)
    .union(nix::fcntl::OFlag::O_CLOEXEC);

/// The directory `name` of `dir`, not through a link.
fn open_dir_at(dir: &nix::dir::Dir, name: &std::ffi::OsStr) -> nix::Result<nix::dir::Dir> {
    nix::dir::Dir::openat(dir, name, BENEATH_DIR, nix::sys::stat::Mode::empty())
}

/// The names in `dir`, without `.` and `..`.
fn dir_names(dir: &mut nix::dir::Dir) -> nix::Result<Vec<std::ffi::OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    for entry in dir.iter() {
        let entry = entry?;
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_os_string());
        }
    }
    Ok(names)
}

/// Removes the entry `name` of `dir` and, a directory, what it holds, at
/// most `depth` levels down; a link is removed, never followed.
fn remove_tree_at(dir: &nix::dir::Dir, name: &std::ffi::OsStr, depth: usize) -> nix::Result<()> {
    use nix::unistd::{unlinkat, UnlinkatFlags};
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Err(nix::Error::EISDIR) => {}
        Err(nix::Error::ENOENT) => return Ok(()),
        done => return done,
    }
    let Some(depth) = depth.checked_sub(1) else {
        return Err(nix::Error::ELOOP);
    };
    let mut sub = open_dir_at(dir, name)?;
    for child in dir_names(&mut sub)? {
        remove_tree_at(&sub, &child, depth)?;
    }
    match unlinkat(dir, name, UnlinkatFlags::RemoveDir) {
        Err(nix::Error::ENOENT) => Ok(()),
        done => done,
    }
}

/// A command's output and errors together, trimmed.
fn output_text(out: &cph_runtime::container::ExecOutput) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}

/// An export path: absolute, beneath `/data` or `/cache`, no `..`.
fn export_path(p: &str) -> bool {
    let path = Path::new(p);
    let mut comps = path.components();
    comps.next() == Some(Component::RootDir)
        && matches!(comps.next(), Some(Component::Normal(n)) if n == "data" || n == "cache")
        && comps.all(|c| matches!(c, Component::Normal(_)))
}

/// Writes a tar of `root` (filtered) straight to the store.
fn upload_tar(
    ctx: &JobContext<'_>,
    root: &Path,
    include: &[String],
    exclude: &[String],
    object: &ObjectRef,
) -> Result<String, JobFailure> {
    let (report, stored) = upload(ctx, root, include, exclude, object)?;
    let mut msg = format!(
        "exported to {}: {} files, {} directories, {} links, {} bytes of data, {} bytes stored",
        url(object),
        report.files,
        report.dirs,
        report.symlinks + report.hardlinks,
        report.bytes,
        stored
    );
    // A running phone's files come and go while they are read.
    if report.vanished > 0 {
        msg.push_str(&format!(
            "; {} entries were deleted while the export read them, left out",
            report.vanished
        ));
    }
    Ok(msg)
}

/// Where a job notes the multipart upload it has open: beside its journal.
fn upload_note(journal: &Path) -> PathBuf {
    journal.with_extension(super::jobstore::UPLOAD_NOTE_EXT)
}

/// Writes `root` (the `include`d paths, `exclude` winning) as a tar to
/// `object` while it is read; what was written and the bytes stored.
fn upload(
    ctx: &JobContext<'_>,
    root: &Path,
    include: &[String],
    exclude: &[String],
    object: &ObjectRef,
) -> Result<(archive::WriteReport, u64), JobFailure> {
    let store = store(ctx)?;
    let _rt = ctx.handle.enter();
    let mut writer = store
        .writer(&object.bucket, &object.key)
        .map_err(|e| store_failure(&e))?;
    // Ended at the agent's next start if this job cannot end it.
    writer.note_upload_in(upload_note(ctx.journal));
    let report = archive::write_tar(root, include, exclude, &mut writer).map_err(|e| {
        match e.root_cause() {
            ArchiveError::Io { source, .. } => match ObjectStoreError::from_io(source) {
                Some(s) => JobFailure::new("CPS.0108", s.to_string()),
                None => JobFailure::internal(format!("export to {}: {e}", url(object))),
            },
            _ => JobFailure::internal(format!("export to {}: {e}", url(object))),
        }
    })?;
    let up = writer
        .finish()
        .map_err(|e| JobFailure::new("CPS.0108", e.to_string()))?;
    Ok((report, up.bytes))
}

/// `batch-storage`: the listed `/data` and `/cache` paths (exclude wins)
/// written as a tar to the store.
pub fn export(
    ctx: &JobContext<'_>,
    phone: &str,
    object: &ObjectRef,
    include: &[String],
    exclude: &[String],
) -> Result<String, JobFailure> {
    if include.is_empty() || !include.iter().all(|p| export_path(p)) {
        return Err(JobFailure::new(
            "CPS.0168",
            format!("include_files must be paths beneath /data or /cache: {include:?}"),
        ));
    }
    if !exclude.iter().all(|p| export_path(p)) {
        return Err(JobFailure::new(
            "CPS.0169",
            format!("exclude_files must be paths beneath /data or /cache: {exclude:?}"),
        ));
    }
    ctx.phones.record(phone)?;
    upload_tar(ctx, &ctx.phones.rootfs(phone)?, include, exclude, object)
}

/// Stops the phone's container (whatever its record says, see
/// [`super::phones::Phones::stop_for_job`]); starts it again when dropped
/// if it was meant to run.
struct Stopped<'a, 'b> {
    ctx: &'a JobContext<'b>,
    phone: &'a str,
    was_running: bool,
}

impl<'a, 'b> Stopped<'a, 'b> {
    fn new(ctx: &'a JobContext<'b>, phone: &'a str) -> Result<Self, JobFailure> {
        let was_running = ctx.phones.stop_for_job(phone)?;
        Ok(Self {
            ctx,
            phone,
            was_running,
        })
    }

    fn restart(mut self) -> Result<(), JobFailure> {
        let result = if self.was_running {
            self.ctx.phones.start(self.phone)
        } else {
            Ok(())
        };
        self.was_running = false;
        result
    }
}

impl Drop for Stopped<'_, '_> {
    fn drop(&mut self) {
        if self.was_running {
            if let Err(e) = self.ctx.phones.start(self.phone) {
                tracing::warn!(phone = self.phone, error = %e, "phone not started again");
            }
        }
    }
}

/// How a restore goes (see [`JobKind::Restore`]).
pub struct RestoreOptions<'a> {
    pub property: Option<&'a BTreeMap<String, String>>,
    pub whole_phone: bool,
    pub remove_object: bool,
}

/// `batch-restore` (and a migration's target side): the phone is stopped,
/// the archive unpacked beside its root and, once whole, merged over it (a
/// migration's whole phone replaces it; see [`unpack_aside`]), the
/// properties recorded, and the phone started again if it was running.
/// The reference sets no size limit on what is restored (a whole phone can
/// be far over a push's 6 GB); the phone's disk bounds it.
pub fn restore(
    ctx: &JobContext<'_>,
    phone: &str,
    object: &ObjectRef,
    opts: &RestoreOptions<'_>,
) -> Result<String, JobFailure> {
    let property = opts.property;
    ctx.phones.record(phone)?;
    if let Some(p) = property {
        validate_properties(p)?;
    }
    // A missing object or a store out of reach fails the job before the
    // phone is stopped.
    let reader = open_download(ctx, object, u64::MAX)?;
    let stopped = Stopped::new(ctx, phone)?;
    let restored = ctx.phones.rootfs(phone).and_then(|root| {
        let into = if opts.whole_phone {
            Unpacked::Replaces
        } else {
            Unpacked::Merges
        };
        let report = unpack_aside(reader, object, &root, into)?;
        // A whole phone brings the `adb_keys` of its former server: this
        // server's key replaces them. The phone is restored either way; a
        // key its data keeps out is named in the answer.
        let key = if opts.whole_phone {
            super::jobs::install_server_key(ctx, phone).err()
        } else {
            None
        };
        if let Some(p) = property.filter(|p| !p.is_empty()) {
            ctx.phones.update_property(phone, p)?;
        }
        Ok((report, key))
    });
    let (report, key) = with_restart(restored, stopped.restart())?;
    if opts.remove_object {
        // The phone is restored whatever becomes of its copy.
        let removed = store(ctx).and_then(|s| {
            ctx.handle
                .block_on(s.delete(&object.bucket, &object.key))
                .map_err(|e| store_failure(&e))
        });
        if let Err(e) = removed {
            tracing::warn!(phone, bucket = %object.bucket, key = %object.key, error = %e.msg, "restored object not removed");
        }
    }
    let done = extracted("restored", object, &report);
    Ok(match key {
        Some(e) => format!("{done}; the server's key is not in the phone: {}", e.msg),
        None => done,
    })
}

/// A job's result after it started its phone again: a failed start fails
/// a job that had succeeded, and is added to the message of one that had
/// not, so the user knows the phone is down.
fn with_restart<T>(
    done: Result<T, JobFailure>,
    started: Result<(), JobFailure>,
) -> Result<T, JobFailure> {
    match (done, started) {
        (Ok(v), Ok(())) => Ok(v),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Err(mut e), Err(s)) => {
            e.msg
                .push_str(&format!("; the phone did not start again: {}", s.msg));
            Err(e)
        }
    }
}

/// Name of the directory a migrated phone is unpacked into first, at the
/// top of the target's root (same volume, so the swap is renames).
const MIGRATE_STAGING: &str = ".cph-migrate-in";
/// Made beside it once the unpack is whole (and synced): the old entries
/// are being deleted.
const MIGRATE_UNPACKED: &str = ".cph-migrate-in.unpacked";
/// Renamed from [`MIGRATE_UNPACKED`] once the old entries are gone: the new
/// ones are being moved into place.
const MIGRATE_MOVING: &str = ".cph-migrate-in.moving";
/// Made beside the staging directory once a restore's unpack is whole (and
/// synced): its entries are being merged into the root.
const RESTORE_MERGING: &str = ".cph-migrate-in.merging";

/// What a whole unpack does to the phone's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unpacked {
    /// A migration's whole phone: the old entries go, the new take their
    /// place.
    Replaces,
    /// An export's tar: its entries are merged over the root, as an
    /// extraction in place would leave it (files replaced, directories
    /// merged), the rest of the root kept.
    Merges,
}

/// A restore: the archive is unpacked beside the phone's current contents
/// first (same volume), and only a complete unpack goes into the root,
/// by renames, so a failed download or a bad archive leaves the phone as
/// it was. A kill while it goes in is finished by [`settle_migration`] at
/// the agent's next start (the phone is then the restored one, never
/// part of it).
fn unpack_aside(
    mut reader: ObjectReader,
    object: &ObjectRef,
    root: &Path,
    into: Unpacked,
) -> Result<ExtractReport, JobFailure> {
    let staging = root.join(MIGRATE_STAGING);
    for leftover in [MIGRATE_UNPACKED, MIGRATE_MOVING, RESTORE_MERGING] {
        remove_entry(&root.join(leftover))?;
    }
    remove_entry(&staging)?;
    std::fs::create_dir(&staging).map_err(|e| migration_fail("staging", &staging, e))?;
    // A kill leaves the staging directory, removed at the agent's start.
    // A failure removes it: what it held is not named, the phone's root
    // is untouched.
    let report = match archive::extract_lent(&mut reader, &staging, &phone_extract_options(None)) {
        Ok(r) => r,
        Err(e) => {
            let _ = remove_entry(&staging);
            let mut f = archive_failure(object, e.root_cause());
            f.msg.push_str("; the phone's root is as it was");
            return Err(f);
        }
    };
    // Names of the agent's own at the top of the root are not an
    // archive's to bring.
    for name in dir_entries(&staging)? {
        if name.to_string_lossy().starts_with(MIGRATE_STAGING) {
            remove_entry(&staging.join(&name))?;
        }
    }
    let marker = root.join(match into {
        Unpacked::Replaces => MIGRATE_UNPACKED,
        Unpacked::Merges => RESTORE_MERGING,
    });
    std::fs::File::create(&marker).map_err(|e| migration_fail("mark", &marker, e))?;
    sync_dir(root)?;
    settle_migration(root)?;
    Ok(report)
}

/// Moves every entry of `from` into `to` (a directory of the phone's root,
/// the phone stopped): a name `to` does not have is renamed in; a file,
/// link or other entry replaces what `to` has under its name; a directory
/// both have is merged into and takes the unpacked one's owner, mode and
/// times. Whatever was moved is gone from `from`, so it can be run again
/// after a kill and go on where it stopped. Nothing beneath `to` is
/// followed: an entry is looked at without following a link.
fn merge_tree(from: &Path, to: &Path) -> Result<(), JobFailure> {
    for name in dir_entries(from)? {
        let (src, dst) = (from.join(&name), to.join(&name));
        let src_meta = src
            .symlink_metadata()
            .map_err(|e| migration_fail("read", &src, e))?;
        let src_dir = src_meta.is_dir();
        match dst.symlink_metadata() {
            Ok(m) if m.is_dir() && src_dir => {
                merge_tree(&src, &dst)?;
                copy_dir_meta(&src_meta, &dst)?;
                std::fs::remove_dir(&src).map_err(|e| migration_fail("merge", &src, e))?;
                continue;
            }
            // A directory and a file under one name: the unpacked one wins,
            // as an extraction in place would have it.
            Ok(m) if m.is_dir() || src_dir => {
                remove_entry(&dst)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(migration_fail("read", &dst, e)),
        }
        std::fs::rename(&src, &dst).map_err(|e| migration_fail("move", &dst, e))?;
    }
    Ok(())
}

/// Gives the directory `dst` the owner, mode and times `m` says.
fn copy_dir_meta(m: &std::fs::Metadata, dst: &Path) -> Result<(), JobFailure> {
    use std::os::unix::fs::MetadataExt;
    std::os::unix::fs::lchown(dst, Some(m.uid()), Some(m.gid()))
        .and_then(|()| std::fs::set_permissions(dst, m.permissions()))
        .and_then(|()| {
            let times = std::fs::FileTimes::new()
                .set_accessed(m.accessed()?)
                .set_modified(m.modified()?);
            std::fs::File::open(dst)?.set_times(times)
        })
        .map_err(|e| migration_fail("merge", dst, e))
}

fn migration_fail(what: &str, p: &Path, e: io::Error) -> JobFailure {
    JobFailure::internal(format!("migration {what} {}: {e}", p.display()))
}

fn sync_dir(dir: &Path) -> Result<(), JobFailure> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| migration_fail("sync", dir, e))
}

fn dir_entries(dir: &Path) -> Result<Vec<std::ffi::OsString>, JobFailure> {
    std::fs::read_dir(dir)
        .map_err(|e| migration_fail("list", dir, e))?
        .map(|e| {
            e.map(|e| e.file_name())
                .map_err(|e| migration_fail("list", dir, e))
        })
        .collect()
}

/// What [`settle_migration`] found in a phone's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// No migration was under way.
    Nothing,
    /// An unpack not whole was removed; the root is as it was.
    Undone,
    /// A swap under way was finished; the root is the migrated phone's.
    Finished,
}

/// Brings a phone's root out of a restore wherever it stopped: an unpack
/// not yet whole is removed (the old root untouched); from a whole unpack
/// on, it goes to its end: a migration's swap (the old entries deleted, the
/// new moved into place), or a restore's merge.
pub(crate) fn settle_migration(root: &Path) -> Result<Settled, JobFailure> {
    let staging = root.join(MIGRATE_STAGING);
    let (unpacked, moving) = (root.join(MIGRATE_UNPACKED), root.join(MIGRATE_MOVING));
    let merging = root.join(RESTORE_MERGING);
    let has = |p: &Path| p.symlink_metadata().is_ok();
    if has(&merging) && has(&staging) {
        merge_tree(&staging, root)?;
        std::fs::remove_dir(&staging).map_err(|e| migration_fail("staging", &staging, e))?;
        remove_entry(&merging)?;
        sync_dir(root)?;
        return Ok(Settled::Finished);
    }
    if has(&unpacked) && has(&staging) {
        let ours = [MIGRATE_STAGING, MIGRATE_UNPACKED, MIGRATE_MOVING];
        for name in dir_entries(root)? {
            if !ours.iter().any(|o| name == *o) {
                remove_entry(&root.join(&name))?;
            }
        }
        std::fs::rename(&unpacked, &moving).map_err(|e| migration_fail("mark", &moving, e))?;
        sync_dir(root)?;
    }
    if has(&moving) && has(&staging) {
        // Only new entries are in the root now: no name is taken twice.
        for name in dir_entries(&staging)? {
            let (from, to) = (staging.join(&name), root.join(&name));
            std::fs::rename(&from, &to).map_err(|e| migration_fail("move", &to, e))?;
        }
        std::fs::remove_dir(&staging).map_err(|e| migration_fail("staging", &staging, e))?;
        remove_entry(&moving)?;
        sync_dir(root)?;
        return Ok(Settled::Finished);
    }
    // Markers without their staging directory: the swap had ended.
    let markers = remove_entry(&unpacked)? | remove_entry(&moving)? | remove_entry(&merging)?;
    if remove_entry(&staging)? {
        return Ok(Settled::Undone);
    }
    Ok(if markers {
        Settled::Finished
    } else {
        Settled::Nothing
    })
}

/// Whole-phone migration, source side: the phone is stopped and its whole
/// root written to the store (the control plane has the target restore
/// it). The phone stays stopped, as the reference asks; when the write
/// fails it is started again if it was running, as it was before.
pub fn migrate_out(
    ctx: &JobContext<'_>,
    phone: &str,
    object: &ObjectRef,
) -> Result<String, JobFailure> {
    ctx.phones.record(phone)?;
    make_own_bucket(ctx, object, MIGRATE_BUCKET)?;
    // A phone stopped on purpose may be migrated too.
    let was_running = ctx.phones.stop_for_job(phone)?;
    let written = ctx
        .phones
        .rootfs(phone)
        .and_then(|root| upload_tar(ctx, &root, &[], &whole_root_exclude(), object));
    if written.is_ok() {
        ctx.phones.keep_stopped(phone)?;
        return written;
    }
    if !was_running {
        return written;
    }
    with_restart(written, ctx.phones.start(phone))
}

/// Creates `own`, a bucket of the platform's, when `object` is in it.
fn make_own_bucket(ctx: &JobContext<'_>, object: &ObjectRef, own: &str) -> Result<(), JobFailure> {
    if object.bucket != own {
        return Ok(());
    }
    ctx.handle
        .block_on(store(ctx)?.create_bucket(&object.bucket))
        .map_err(|e| JobFailure::new("CPS.0102", e.to_string()))
}

/// What a whole phone's tar (a migration, an image) leaves out.
fn whole_root_exclude() -> Vec<String> {
    MIGRATE_EXCLUDE.iter().map(|s| s.to_string()).collect()
}

/// A custom image of a phone: the phone is stopped so its root is written
/// whole and consistent, then started again if it was meant to run (also
/// when the write failed).
pub fn create_image(
    ctx: &JobContext<'_>,
    phone: &str,
    object: &ObjectRef,
) -> Result<String, JobFailure> {
    ctx.phones.record(phone)?;
    make_own_bucket(ctx, object, IMAGE_BUCKET)?;
    let was_running = ctx.phones.stop_for_job(phone)?;
    let written = ctx
        .phones
        .rootfs(phone)
        .and_then(|root| upload(ctx, &root, &[], &whole_root_exclude(), object));
    let started = if was_running {
        ctx.phones.start(phone)
    } else {
        Ok(())
    };
    let (_, stored) = with_restart(written, started)?;
    Ok(image_written(&url(object), stored))
}

fn share_failure(code: &str, e: StorageError) -> JobFailure {
    match e {
        StorageError::BadSharePath(_) => JobFailure::new(code, e.to_string()),
        StorageError::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound => {
            JobFailure::new(code, e.to_string())
        }
        other => JobFailure::internal(other.to_string()),
    }
}

/// Host path of a sharepool path as the API names it: `/data/x` lies in the
/// shared files tree, `/apps/...` style paths are not accepted here. Every
/// existing component must be a real directory (a symlink pushed in a tar
/// never redirects a push, a listing or a deletion outside the pool); the
/// last one may be a symlink only when `link_last` (a deletion removes the
/// link itself).
fn share_files_path(
    paths: &SharePaths,
    api_path: &str,
    link_last: bool,
) -> Result<PathBuf, JobFailure> {
    let bad = || JobFailure::new("CPS.0155", format!("share path {api_path:?} is invalid"));
    let rel = api_path.trim_end_matches('/');
    let full = format!("/files{rel}");
    let host = cph_runtime::storage::share::resolve_share_path(paths, &full).map_err(|_| bad())?;
    let mut at = paths.files.clone();
    let rest = host.strip_prefix(&paths.files).map_err(|_| bad())?;
    let comps: Vec<_> = rest.components().collect();
    for (i, c) in comps.iter().enumerate() {
        at.push(c);
        let last = i + 1 == comps.len();
        match at.symlink_metadata() {
            Ok(md) if md.file_type().is_symlink() && (!last || !link_last) => return Err(bad()),
            Ok(md) if !last && !md.is_dir() => return Err(bad()),
            _ => {}
        }
    }
    Ok(host)
}

/// Installs a shared application in each running phone of `server_id`
/// from where the sharepool shows it ([`PHONE_SHARE_APPS_DIR`]): its APKs
/// (`base.apk` first, then the others by name) through `pm install -r`, or
/// `install-multiple` for several. Stopped phones are named, not started;
/// the job fails naming the phones whose `pm` failed.
pub fn preinstall_share_app(
    ctx: &JobContext<'_>,
    server_id: &str,
    package: &str,
) -> Result<String, JobFailure> {
    let dir = ctx.phones.share_paths()?.apps.join(package);
    let mut apks: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| JobFailure::internal(format!("list {}: {e}", dir.display())))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".apk"))
        .collect();
    apks.sort_by_key(|n| (n != "base.apk", n.clone()));
    if apks.is_empty() {
        return Err(JobFailure::new(
            "CPS.0119",
            format!("shared app {package} holds no .apk file to install"),
        ));
    }
    if apks.len() > MAX_APKS {
        return Err(JobFailure::new(
            "CPS.0118",
            format!(
                "shared app {package} holds {} APKs, more than {MAX_APKS}",
                apks.len()
            ),
        ));
    }
    let in_phone: Vec<String> = apks
        .iter()
        .map(|n| format!("{PHONE_SHARE_APPS_DIR}/{package}/{n}"))
        .collect();
    let verb = if apks.len() > 1 {
        "install-multiple"
    } else {
        "install"
    };
    let mut argv = vec!["pm", verb, "-r"];
    argv.extend(in_phone.iter().map(String::as_str));
    let (mut installed, mut stopped, mut failed) = (0, Vec::new(), Vec::new());
    for phone in ctx.phones.phones_of(server_id) {
        let _held = ctx.phones.hold(&phone);
        if ctx.phones.require_running(&phone).is_err() {
            stopped.push(phone);
            continue;
        }
        match ctx
            .phones
            .exec(&phone, &argv, INSTALL_TIMEOUT, EXECUTE_MSG_MAX)
        {
            Ok(out)
                if out.exit_code == Some(0)
                    && String::from_utf8_lossy(&out.stdout).contains("Success") =>
            {
                installed += 1
            }
            Ok(out) => failed.push(format!("{phone} ({})", output_text(&out))),
            Err(e) => failed.push(format!("{phone} ({})", e.msg)),
        }
    }
    let mut msg = format!("installed in {installed} running phones");
    if !stopped.is_empty() {
        msg.push_str(&format!(
            "; not running, not installed: {}",
            stopped.join(", ")
        ));
    }
    if failed.is_empty() {
        Ok(msg)
    } else {
        Err(JobFailure::new(
            "CPS.0003",
            format!(
                "shared app {package} pushed, {msg}; pm {verb} failed in {}",
                failed.join(", ")
            ),
        ))
    }
}

/// Share files push: the tar is extracted into the shared files tree.
pub fn share_push_files(
    ctx: &JobContext<'_>,
    object: &ObjectRef,
    target_dir: &str,
) -> Result<String, JobFailure> {
    let paths = ctx.phones.share_paths()?;
    let target = share_files_path(&paths, target_dir, false)?;
    // A missing object leaves no new directory behind.
    let reader = open_download(ctx, object, PUSH_MAX_BYTES)?;
    std::fs::create_dir_all(&target)
        .map_err(|e| JobFailure::internal(format!("create {}: {e}", target.display())))?;
    let usage = ctx.phones.share_usage()?;
    // Every phone reads the share, none writes it (a phone with its own
    // user namespace reads it as any user: see `ExtractOptions::public_modes`).
    let opts = ExtractOptions {
        sync: true,
        max_bytes: Some(usage.avail),
        journal: Some(ctx.journal.to_path_buf()),
        public_modes: true,
        ..ExtractOptions::default()
    };
    let report = extract_from(reader, object, &target, &opts)?;
    Ok(extracted("pushed to the share", object, &report))
}

/// Share files listing in the reference's form.
pub fn share_list_files(
    ctx: &JobContext<'_>,
    path: &str,
    offset: u32,
    limit: u32,
) -> Result<String, JobFailure> {
    let paths = ctx.phones.share_paths()?;
    share_files_path(&paths, path, false)?;
    let rel = format!("/files{}", path.trim_end_matches('/'));
    let listing = list_share_dir(&paths, &rel, offset as usize, limit.max(1) as usize)
        .map_err(|e| share_failure("CPS.0155", e))?;
    let usage = ctx.phones.share_usage()?;
    let (capacity, max) = capacity_report(&usage);
    Ok(share_listing_json(listing, &capacity, &max))
}

/// A share listing in the reference's JSON, at most [`EXECUTE_MSG_MAX`]
/// bytes: the job store cuts a longer `execute_msg` wherever the limit
/// falls, which would leave it invalid JSON. Entries are dropped from the
/// end until it fits; `count` says how many it holds and `total` stays the
/// directory's, so the next page starts at `offset + count`.
fn share_listing_json(mut listing: ShareListing, capacity: &str, max: &str) -> String {
    loop {
        listing.count = listing.files.len();
        let msg = serde_json::json!({
            "files_in_path": listing,
            "share_base_capacity": capacity,
            "share_base_max_size": max,
        })
        .to_string();
        if msg.len() <= EXECUTE_MSG_MAX || listing.files.pop().is_none() {
            return msg;
        }
    }
}

/// Removes a sharepool entry: a directory with its tree, anything else
/// (links included, never followed) by itself. `false` when it is not there.
pub(crate) fn remove_entry(path: &Path) -> Result<bool, JobFailure> {
    let result = match path.symlink_metadata() {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return Ok(false),
    };
    result
        .map(|()| true)
        .map_err(|e| JobFailure::internal(format!("delete {}: {e}", path.display())))
}

/// Removes everything in the sharepool's files and apps; how many entries
/// went.
pub fn empty_sharepool(ctx: &JobContext<'_>) -> Result<usize, JobFailure> {
    let paths = ctx.phones.share_paths()?;
    let mut removed = 0;
    for dir in [&paths.files, &paths.apps] {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(JobFailure::internal(format!("read {}: {e}", dir.display())));
            }
        };
        for entry in entries {
            let entry =
                entry.map_err(|e| JobFailure::internal(format!("read {}: {e}", dir.display())))?;
            if remove_entry(&entry.path())? {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Share files deletion; a path that does not exist is reported, not fatal.
pub fn share_delete_files(
    ctx: &JobContext<'_>,
    api_paths: &[String],
) -> Result<String, JobFailure> {
    let paths = ctx.phones.share_paths()?;
    let mut resolved = Vec::new();
    for p in api_paths {
        let host = share_files_path(&paths, p, true)?;
        if host == paths.files {
            return Err(JobFailure::new(
                "CPS.0155",
                "the share's root cannot be deleted",
            ));
        }
        resolved.push((p, host));
    }
    let mut missing = Vec::new();
    for (p, host) in resolved {
        if !remove_entry(&host)? {
            missing.push(p.as_str());
        }
    }
    Ok(if missing.is_empty() {
        format!("deleted {} paths", api_paths.len())
    } else {
        format!("deleted; not found: {}", missing.join(" "))
    })
}

/// Share apps push: the application's tar is extracted into
/// `apps/<package>/`, replacing an earlier version only when complete.
pub fn share_push_apps(
    ctx: &JobContext<'_>,
    object: &ObjectRef,
    package: &str,
) -> Result<String, JobFailure> {
    if !apk::valid_package(package) {
        return Err(JobFailure::new(
            "CPS.0173",
            format!("package name {package:?} is invalid"),
        ));
    }
    let paths = ctx.phones.share_paths()?;
    let usage = ctx.phones.share_usage()?;
    let target = paths.apps.join(package);
    let fresh = paths.apps.join(format!(".{package}.new"));
    let _ = std::fs::remove_dir_all(&fresh);
    let opts = ExtractOptions {
        sync: true,
        staging: true,
        max_bytes: Some(usage.avail),
        public_modes: true,
        ..ExtractOptions::default()
    };
    let report = download_extract(ctx, object, PUSH_MAX_BYTES, &fresh, &opts)?;
    // The new version takes the old one's place in one step (phones see
    // one or the other, and a kill never leaves the app gone); the old one
    // is then removed from where the new one was.
    let swapped = if target.symlink_metadata().is_ok() {
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &fresh,
            nix::fcntl::AT_FDCWD,
            &target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(io::Error::from)
    } else {
        std::fs::rename(&fresh, &target)
    };
    swapped.map_err(|e| JobFailure::internal(format!("rename {}: {e}", target.display())))?;
    let _ = remove_entry(&fresh);
    Ok(extracted(
        &format!("shared app {package} from"),
        object,
        &report,
    ))
}

/// The versions of the sharepool's APKs as last read, by path, with the
/// modification time and size they were read at: every heartbeat asks for
/// the shared applications, and a manifest is read again only when its
/// file changed.
#[derive(Default)]
pub struct ShareAppVersions {
    read: std::sync::Mutex<HashMap<PathBuf, ReadVersion>>,
}

/// An APK's modification time and size, and the version read then.
type ReadVersion = (std::time::SystemTime, u64, Option<String>);

/// The applications of the sharepool: each `apps/<package>/` directory
/// with the distinct versions its APKs' manifests give (an APK whose
/// manifest cannot be read counts with no version); by package name.
pub fn share_apps(paths: &SharePaths, known: &ShareAppVersions) -> io::Result<Vec<ShareApp>> {
    let mut read = known.read.lock().unwrap_or_else(|p| p.into_inner());
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&paths.apps)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() || !apk::valid_package(&name) {
            continue; // a push being staged (`.<package>.new`) or a stray file
        }
        let mut versions = std::collections::BTreeSet::new();
        for f in std::fs::read_dir(entry.path())? {
            let f = f?;
            let path = f.path();
            if !f.file_type()?.is_file() || path.extension() != Some("apk".as_ref()) {
                continue;
            }
            let md = f.metadata()?;
            let stamp = (md.modified()?, md.len());
            let version = match read.remove(&path) {
                Some((at, len, v)) if (at, len) == stamp => v,
                _ => std::fs::File::open(&path)
                    .ok()
                    .and_then(|file| apk::read_manifest(io::BufReader::new(file)).ok())
                    .and_then(|m| m.version),
            };
            versions.extend(version.clone());
            seen.insert(path, (stamp.0, stamp.1, version));
        }
        out.push(ShareApp {
            package_name: name,
            versions: versions.into_iter().collect(),
        });
    }
    // APKs gone since are forgotten.
    *read = seen;
    out.sort_by(|a, b| a.package_name.cmp(&b.package_name));
    Ok(out)
}

/// Share apps deletion.
pub fn share_delete_apps(ctx: &JobContext<'_>, packages: &[String]) -> Result<String, JobFailure> {
    if let Some(bad) = packages.iter().find(|p| !apk::valid_package(p)) {
        return Err(JobFailure::new(
            "CPS.0173",
            format!("package name {bad:?} is invalid"),
        ));
    }
    let paths = ctx.phones.share_paths()?;
    let mut missing = Vec::new();
    for p in packages {
        if !remove_entry(&paths.apps.join(p))? {
            missing.push(p.as_str());
        }
    }
    Ok(if missing.is_empty() {
        format!("deleted {} shared apps", packages.len())
    } else {
        format!("deleted; not found: {}", missing.join(" "))
    })
}

/// Writes `data` beneath the phone's root at `rel` through the extractor
/// (used for small files the agent places in a phone).
pub fn write_into_phone(root: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), JobFailure> {
    let tar = single_file_tar(rel, data.len() as u64, mode, data)
        .map_err(|e| JobFailure::internal(format!("entry {rel}: {e}")))?;
    archive::extract(tar, root, &ExtractOptions::default())
        .map(drop)
        .map_err(|e| JobFailure::internal(format!("write {rel} in the phone: {e}")))
}

#[cfg(test)]
mod tests {
    use super::{
        settle_migration, Settled, MIGRATE_MOVING, MIGRATE_STAGING, MIGRATE_UNPACKED,
        RESTORE_MERGING,
    };
    use std::path::Path;

    /// Every file beneath `root` with its contents, sorted.
    fn files(root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else {
                    let rel = p.strip_prefix(root).expect("beneath").display().to_string();
                    out.push((rel, std::fs::read_to_string(&p).expect("read")));
                }
            }
        }
        out.sort();
        out
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    fn new_phone() -> Vec<(String, String)> {
        [
            ("data/app/a", "new a"),
            ("data/b", "new b"),
            ("system/c", "new c"),
        ]
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
    }

    /// A restore's swap is undone before its unpack is whole and finished
    /// from then on, wherever a kill cut it off; the root never mixes the
    /// two phones.
    #[test]
    fn a_migration_cut_off_anywhere_settles_to_one_phone() {
        let old = |root: &Path| {
            write(root, "data/b", "old b");
            write(root, "data/old-only", "old");
            write(root, "vendor/d", "old d");
        };
        let staged = |root: &Path, names: &[&str]| {
            for (p, t) in new_phone() {
                if names.iter().any(|n| p.starts_with(n)) {
                    write(&root.join(MIGRATE_STAGING), &p, &t);
                }
            }
        };
        let all = ["data", "system"];
        // Settled as `want`, the root holding the new phone alone.
        let settles_to = |root: &Path, want: Settled| {
            assert_eq!(settle_migration(root).expect("settle"), want);
            assert_eq!(files(root), new_phone());
        };
        // Unpack cut off: the old phone stays.
        let t = tempfile::tempdir().expect("tempdir");
        old(t.path());
        staged(t.path(), &["data"]);
        let before: Vec<_> = files(t.path())
            .into_iter()
            .filter(|(p, _)| !p.starts_with(MIGRATE_STAGING))
            .collect();
        assert_eq!(settle_migration(t.path()).expect("settle"), Settled::Undone);
        assert_eq!(files(t.path()), before);
        // Whole, old entries partly deleted.
        let t = tempfile::tempdir().expect("tempdir");
        write(t.path(), "vendor/d", "old d");
        staged(t.path(), &all);
        std::fs::write(t.path().join(MIGRATE_UNPACKED), "").expect("marker");
        settles_to(t.path(), Settled::Finished);
        // Old entries gone, new ones partly moved.
        let t = tempfile::tempdir().expect("tempdir");
        write(t.path(), "data/app/a", "new a");
        write(t.path(), "data/b", "new b");
        staged(t.path(), &["system"]);
        std::fs::write(t.path().join(MIGRATE_MOVING), "").expect("marker");
        settles_to(t.path(), Settled::Finished);
        // Everything moved, the marker left.
        std::fs::write(t.path().join(MIGRATE_MOVING), "").expect("marker");
        settles_to(t.path(), Settled::Finished);
        // Nothing under way: nothing touched.
        settles_to(t.path(), Settled::Nothing);
        // Whole, nothing deleted yet (the old phone is there in full).
        let t = tempfile::tempdir().expect("tempdir");
        old(t.path());
        staged(t.path(), &all);
        std::fs::write(t.path().join(MIGRATE_UNPACKED), "").expect("marker");
        settles_to(t.path(), Settled::Finished);
    }

    #[test]
    fn store_failures_carry_the_reference_codes() {
        use super::{store_failure, ObjectStoreError as E};
        let (bucket, key) = ("b".to_string(), "k.tar".to_string());
        let cases = [
            (
                E::NotFound {
                    bucket: bucket.clone(),
                    key: key.clone(),
                },
                "CPS.0104",
            ),
            (
                E::TooLarge {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    size: 7 << 30,
                    limit: 6 << 30,
                },
                "CPS.0118",
            ),
            (
                E::AccessDenied {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    detail: "403".into(),
                },
                "CPS.0104",
            ),
            (
                E::Unreachable {
                    endpoint: "http://127.0.0.1:9".into(),
                    detail: "connection refused".into(),
                },
                "CPS.0003",
            ),
        ];
        for (e, code) in cases {
            let f = store_failure(&e);
            assert_eq!(f.code, code, "{e}");
            assert!(f.msg.contains(&e.to_string()), "{}", f.msg);
        }
        let denied = store_failure(&E::AccessDenied {
            bucket,
            key,
            detail: "403".into(),
        });
        assert!(
            denied.msg.contains("read access to bucket b"),
            "{}",
            denied.msg
        );
    }

    use super::*;

    /// A listing of long names is cut to fit the job's `execute_msg`, as
    /// valid JSON whose `count` says how many it holds; a short one is
    /// whole.
    #[test]
    fn a_share_listing_fits_in_an_execute_msg_as_valid_json() {
        let files: Vec<String> = (0..50)
            .map(|i| format!("4096 Apr 15 09:49 {}-{i:02}", "long-name".repeat(4)))
            .collect();
        let listed = |files: &[String]| {
            let listing = ShareListing {
                total: 120,
                count: files.len(),
                files: files.to_vec(),
            };
            let msg = share_listing_json(listing, "8.9G 323M 8.2G 4%", "50G");
            // What the job store keeps of it.
            let kept = super::super::jobstore::succeeded("j", Some(&msg))
                .execute_msg
                .expect("execute_msg");
            serde_json::from_str::<serde_json::Value>(&kept).expect("valid json")
        };
        let v = listed(&files);
        let page = &v["files_in_path"];
        let count = page["count"].as_u64().expect("count") as usize;
        assert!(count > 0 && count < files.len(), "{v}");
        assert_eq!(page["files"], serde_json::json!(files[..count]));
        assert_eq!(page["total"], 120);
        assert_eq!(v["share_base_capacity"], "8.9G 323M 8.2G 4%");
        assert_eq!(v["share_base_max_size"], "50G");
        let v = listed(&files[..3]);
        assert_eq!(v["files_in_path"]["count"], 3);
        assert_eq!(v["files_in_path"]["files"], serde_json::json!(files[..3]));
    }

    /// The installation directories a kill left go, whatever they hold,
    /// and nothing else: not the phone's other files, and nothing a link
    /// the phone made points at, in a leftover or on the way to it.
    #[test]
    fn install_leftovers_go_and_no_link_is_followed() {
        let t = tempfile::tempdir().expect("tempdir");
        let (root, outside) = (t.path().join("root"), t.path().join("outside"));
        let tmp = root.join(INSTALL_DIR);
        write(&tmp, "cph-install-a/0.apk", "apk");
        write(&tmp, "cph-install-b/sub/deep/f", "f");
        write(&tmp, "cph-install-c", "a file by the name");
        write(&tmp, "keep/cph-install-d/0.apk", "not in the directory");
        write(&tmp, "keep.txt", "kept");
        write(&outside, "cph-install-o/f", "the host's");
        write(&outside, "data/local/tmp/cph-install-x/f", "the host's");
        std::os::unix::fs::symlink(&outside, tmp.join("cph-install-link")).expect("symlink");
        std::os::unix::fs::symlink(&outside, tmp.join("cph-install-a/out")).expect("symlink");
        let host = files(&outside);
        assert_eq!(remove_install_leftovers(&root).expect("removed"), 4);
        assert_eq!(
            files(&root),
            [
                ("data/local/tmp/keep.txt", "kept"),
                (
                    "data/local/tmp/keep/cph-install-d/0.apk",
                    "not in the directory"
                ),
            ]
            .map(|(p, t)| (p.to_string(), t.to_string()))
        );
        assert_eq!(files(&outside), host);
        assert_eq!(remove_install_leftovers(&root).expect("none"), 0);
        // A link on the way (`/data/local` -> the host) is not followed.
        std::fs::remove_dir_all(root.join("data/local")).expect("rm");
        std::os::unix::fs::symlink(outside.join("data/local"), root.join("data/local"))
            .expect("symlink");
        assert_eq!(remove_install_leftovers(&root).expect("nothing"), 0);
        assert_eq!(files(&outside), host);
        // A phone without the directory has none.
        assert_eq!(
            remove_install_leftovers(&outside.join("cph-install-o")).expect("none"),
            0
        );
        // One deeper than the limit fails rather than going on down.
        let deep = ["d"; INSTALL_LEFTOVER_DEPTH + 1].join("/");
        write(
            &outside,
            &format!("data/local/tmp/cph-install-x/{deep}/f"),
            "f",
        );
        assert!(remove_install_leftovers(&outside).is_err());
    }

    #[test]
    fn export_paths_stay_in_data_and_cache() {
        assert!(export_path("/data/app"));
        assert!(export_path("/cache"));
        assert!(export_path("/data/media/0/DCIM"));
        assert!(!export_path("/system"));
        assert!(!export_path("data/app"));
        assert!(!export_path("/data/../etc"));
        assert!(!export_path("/database"));
        assert!(!export_path("/"));
    }

    #[test]
    fn single_file_tar_extracts_beneath_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = vec![7u8; 1000];
        let tar = single_file_tar("data/local/tmp/x/0.apk", 1000, 0o644, &body[..]).expect("tar");
        archive::extract(tar, dir.path(), &ExtractOptions::default()).expect("extract");
        let got = std::fs::read(dir.path().join("data/local/tmp/x/0.apk")).expect("read");
        assert_eq!(got, body);
    }

    #[test]
    fn share_apps_with_the_versions_of_their_apks() {
        use crate::apk::tests::{axml_doc, zip_with};
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SharePaths {
            files: dir.path().join("files"),
            apps: dir.path().join("apps"),
        };
        let apk = |version: &str| {
            let doc = axml_doc(
                &["manifest", "package", "com.e.game", "versionName", version],
                &[(1, 2, 3, 2), (3, 4, 3, 4)],
                &[],
                true,
            );
            zip_with(&[("AndroidManifest.xml", &doc)])
        };
        let game = paths.apps.join("com.e.game");
        std::fs::create_dir_all(&game).expect("mkdir");
        std::fs::write(game.join("base.apk"), apk("2.0")).expect("base");
        std::fs::write(game.join("split_a.apk"), apk("2.0")).expect("split");
        std::fs::write(game.join("lib.so"), b"\x7fELF").expect("lib");
        let broken = paths.apps.join("com.e.broken");
        std::fs::create_dir_all(&broken).expect("mkdir");
        std::fs::write(broken.join("base.apk"), b"not a zip").expect("broken");
        std::fs::create_dir_all(paths.apps.join(".com.e.game.new")).expect("staging");
        std::fs::write(paths.apps.join("stray.txt"), b"x").expect("stray");
        let known = ShareAppVersions::default();
        let listed = || {
            share_apps(&paths, &known)
                .expect("apps")
                .into_iter()
                .map(|a| (a.package_name, a.versions))
                .collect::<Vec<_>>()
        };
        let want = |game: &str| {
            vec![
                ("com.e.broken".to_string(), vec![]),
                ("com.e.game".to_string(), vec![game.to_string()]),
            ]
        };
        assert_eq!(listed(), want("2.0"));
        assert_eq!(listed(), want("2.0"), "read again unchanged");
        // A replaced APK is read again (another size).
        std::fs::write(game.join("base.apk"), apk("2.10")).expect("base");
        std::fs::write(game.join("split_a.apk"), apk("2.10")).expect("split");
        assert_eq!(listed(), want("2.10"));
    }

    #[test]
    fn share_paths_never_follow_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = SharePaths {
            files: dir.path().join("files"),
            apps: dir.path().join("apps"),
        };
        std::fs::create_dir_all(paths.files.join("data/real")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", paths.files.join("data/link")).expect("symlink");
        assert!(share_files_path(&paths, "/data/real/x", false).is_ok());
        assert!(
            share_files_path(&paths, "/data/link", true).is_ok(),
            "the link itself, to delete"
        );
        assert_eq!(
            share_files_path(&paths, "/data/link", false).map_err(|e| e.code),
            Err("CPS.0155".to_string()),
            "pushed into or listed through"
        );
        for link_last in [false, true] {
            assert_eq!(
                share_files_path(&paths, "/data/link/passwd", link_last).map_err(|e| e.code),
                Err("CPS.0155".to_string())
            );
            assert!(share_files_path(&paths, "/data/../x", link_last).is_err());
        }
        assert_eq!(
            share_files_path(&paths, "/", false).expect("root"),
            paths.files.clone()
        );
    }

    /// A restore's whole unpack is merged over the root (files replaced, a
    /// directory both have merged and given the unpacked one's mode, a
    /// directory where a file comes replaced, the rest kept), also when a
    /// kill stopped the merge part way; an unpack not whole is undone.
    #[test]
    fn a_restore_merges_once_whole_and_after_a_kill() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path();
        let staging = root.join(MIGRATE_STAGING);
        write(root, "data/b", "old b");
        write(root, "data/keep", "kept");
        write(root, "data/x/inside", "a directory where a file comes");
        let before = files(root);
        write(&staging, "data/b", "new b");
        write(&staging, "data/new", "new");
        write(&staging, "data/x", "now a file");
        std::fs::set_permissions(staging.join("data"), std::fs::Permissions::from_mode(0o750))
            .expect("mode");
        // Cut off before the unpack was whole: undone.
        let aside = root.join("aside");
        std::fs::rename(&staging, &aside).expect("aside");
        std::fs::create_dir(&staging).expect("staging");
        write(&staging, "data/partial", "x");
        assert_eq!(settle_migration(root).expect("settle"), Settled::Undone);
        let undone: Vec<_> = files(root)
            .into_iter()
            .filter(|(p, _)| !p.starts_with("aside"))
            .collect();
        assert_eq!(undone, before);
        std::fs::rename(&aside, &staging).expect("back");
        // Whole, then killed with one entry moved.
        std::fs::write(root.join(RESTORE_MERGING), "").expect("marker");
        std::fs::rename(staging.join("data/new"), root.join("data/new")).expect("moved");
        assert_eq!(settle_migration(root).expect("settle"), Settled::Finished);
        let want: Vec<(String, String)> = [
            ("data/b", "new b"),
            ("data/keep", "kept"),
            ("data/new", "new"),
            ("data/x", "now a file"),
        ]
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
        assert_eq!(files(root), want);
        let mode = std::fs::metadata(root.join("data"))
            .expect("data")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o750);
        assert_eq!(settle_migration(root).expect("settle"), Settled::Nothing);
    }
}
