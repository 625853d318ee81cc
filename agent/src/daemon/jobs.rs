//! Running one job against the phones: the protocol's [`JobKind`] mapped to
//! phone lifecycle steps and in-phone commands. Runs on a blocking thread
//! (the container runtime is synchronous). Each job either succeeds with an
//! optional `execute_msg` or fails with a reference error code.
//!
//! Object-store jobs (push, install, export, restore, migrate, share files
//! and apps) live in [`super::transfer`].

use std::path::Path;
use std::time::Duration;

use super::phones::Phones;
use super::{transfer, JobFailure};
use crate::objstore::ObjectStore;
use crate::protocol::{CreateServer, ImageRef, JobKind, JobRequest, PhoneSpec, EXECUTE_MSG_MAX};

/// The sync shell's limit (the reference answers within 2 s).
pub const SYNC_SHELL_LIMIT: Duration = Duration::from_secs(2);

/// What a job needs beyond the phones.
pub struct JobContext<'a> {
    pub phones: &'a Phones,
    pub shell_timeout: Duration,
    /// Host `authorized_keys` file for server keypairs.
    pub authorized_keys: &'a Path,
    /// The object store, when configured.
    pub store: Option<&'a ObjectStore>,
    /// The agent's async runtime (object-store transfers run on it).
    pub handle: &'a tokio::runtime::Handle,
    /// Agent-owned scratch space, never reachable from a phone.
    pub staging_dir: &'a Path,
    /// Phones a [`JobKind::CreateServer`] creates at once.
    pub parallel_creates: usize,
    /// Where the job's archive extraction (push, restore, share files)
    /// lists each path before writing it: a job cut off by a kill then
    /// names them when the agent starts again.
    pub journal: &'a Path,
}

fn phone_of(req: &JobRequest) -> Result<&str, JobFailure> {
    req.phone_id
        .as_deref()
        .ok_or_else(|| JobFailure::new("CPS.0004", format!("job {} names no phone", req.job_id)))
}

/// Output of a shell command as the reference reports it.
fn shell_output(
    ctx: &JobContext<'_>,
    phone: &str,
    command: &str,
    timeout: Duration,
) -> Result<String, JobFailure> {
    // A phone that does not run fails the exec with CPS.0141.
    let out = ctx.phones.exec(
        phone,
        &["/bin/sh", "-c", command],
        timeout,
        EXECUTE_MSG_MAX * 4,
    )?;
    if out.timed_out {
        return Err(JobFailure::new(
            "CPS.0054",
            format!("command timed out after {} ms", timeout.as_millis()),
        ));
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.exit_code != Some(0) {
        return Err(JobFailure {
            code: "CPS.0117".to_string(),
            msg: format!("command exited with {:?}", out.exit_code),
            execute_msg: Some(text),
        });
    }
    Ok(text)
}

/// Runs `req`; returns its `execute_msg`.
pub fn execute(ctx: &JobContext<'_>, req: &JobRequest) -> Result<Option<String>, JobFailure> {
    let phones = ctx.phones;
    match &req.kind {
        JobKind::CreatePhone { phone } => create_phone(ctx, &req.server_id, phone).map(|()| None),
        JobKind::StartPhone => phones.start(phone_of(req)?).map(|()| None),
        JobKind::StopPhone => phones.stop(phone_of(req)?).map(|()| None),
        JobKind::RestartPhone { image, property } => {
            let phone_id = phone_of(req)?;
            let before = phones.record(phone_id)?.image;
            let Some(image) = image.as_ref().filter(|i| i.image_id != before.image_id) else {
                return phones
                    .restart(phone_id, None, property.as_ref())
                    .map(|()| None);
            };
            {
                let _using = phones.image_use();
                transfer::fetch_image(ctx, image)?;
                phones.restart(phone_id, Some(image), property.as_ref())?;
            }
            Ok(drop_left_image(ctx, before))
        }
        JobKind::ResetPhone { image, property } => {
            let phone_id = phone_of(req)?;
            let before = phones.record(phone_id)?.image;
            {
                let _using = phones.image_use();
                if let Some(i) = image {
                    transfer::fetch_image(ctx, i)?;
                }
                phones.reset(phone_id, image.as_ref(), property.as_ref())?;
            }
            // The phone's `/data` is new: the server's key goes back in.
            install_server_key(ctx, phone_id)?;
            let replaced = image
                .as_ref()
                .is_some_and(|i| i.image_id != before.image_id);
            Ok(if replaced {
                drop_left_image(ctx, before)
            } else {
                None
            })
        }
        JobKind::RenamePhone { new_name } => phones.rename(phone_of(req)?, new_name).map(|()| None),
        JobKind::UpdateProperty { property } => {
            phones.update_property(phone_of(req)?, property).map(Some)
        }
        JobKind::DeletePhone => {
            let phone_id = phone_of(req)?;
            let image = phones.record(phone_id).ok().map(|r| r.image);
            phones.delete(phone_id)?;
            Ok(image.and_then(|i| drop_left_image(ctx, i)))
        }
        JobKind::Shell { command } => {
            shell_output(ctx, phone_of(req)?, command, ctx.shell_timeout).map(Some)
        }
        JobKind::SyncShell {
            command,
            timeout_ms,
        } => {
            let limit = Duration::from_millis(*timeout_ms).min(SYNC_SHELL_LIMIT);
            let limit = if limit.is_zero() {
                SYNC_SHELL_LIMIT
            } else {
                limit
            };
            shell_output(ctx, phone_of(req)?, command, limit).map(Some)
        }
        JobKind::Uninstall { flags, package } => {
            let phone = phone_of(req)?;
            if package.is_empty()
                || !package
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            {
                return Err(JobFailure::new(
                    "CPS.0173",
                    format!("package name {package:?} is invalid"),
                ));
            }
            ctx.phones.require_running(phone)?;
            let mut argv: Vec<&str> = vec!["pm", "uninstall"];
            argv.extend(flags.iter().map(String::as_str));
            argv.push(package);
            let out = phones.exec(phone, &argv, ctx.shell_timeout, EXECUTE_MSG_MAX)?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.timed_out {
                return Err(JobFailure::new(
                    "CPS.0054",
                    format!(
                        "pm uninstall {package} timed out after {} s",
                        ctx.shell_timeout.as_secs()
                    ),
                ));
            }
            if out.exit_code == Some(0) {
                Ok(Some(text))
            } else {
                Err(JobFailure {
                    code: "CPS.0003".to_string(),
                    msg: format!("pm uninstall {package} failed"),
                    execute_msg: Some(text),
                })
            }
        }
        JobKind::UpdateKeypair { public_key, .. } => update_keypair(ctx, req, public_key).map(Some),
        JobKind::Push { object } => transfer::push(ctx, phone_of(req)?, object).map(Some),
        JobKind::Install { flags, objects } => {
            transfer::install(ctx, &req.job_id, phone_of(req)?, flags, objects).map(Some)
        }
        JobKind::Export {
            object,
            include,
            exclude,
        } => transfer::export(ctx, phone_of(req)?, object, include, exclude).map(Some),
        JobKind::Restore {
            object,
            property,
            whole_phone,
            remove_object,
        } => transfer::restore(
            ctx,
            phone_of(req)?,
            object,
            &transfer::RestoreOptions {
                property: property.as_ref(),
                whole_phone: *whole_phone,
                remove_object: *remove_object,
            },
        )
        .map(Some),
        JobKind::Migrate { object, .. } => {
            transfer::migrate_out(ctx, phone_of(req)?, object).map(Some)
        }
        JobKind::SharePushFiles { object, target_dir } => {
            transfer::share_push_files(ctx, object, target_dir).map(Some)
        }
        JobKind::ShareListFiles {
            path,
            offset,
            limit,
        } => transfer::share_list_files(ctx, path, *offset, *limit).map(Some),
        JobKind::ShareDeleteFiles { paths } => transfer::share_delete_files(ctx, paths).map(Some),
        JobKind::SharePushApps {
            object,
            package_name,
            pre_install,
        } => transfer::share_push_apps(ctx, object, package_name)
            .and_then(|msg| {
                if *pre_install {
                    transfer::preinstall_share_app(ctx, &req.server_id, package_name)
                        .map(|done| format!("{msg}; {done}"))
                } else {
                    Ok(msg)
                }
            })
            .map(Some),
        JobKind::ShareDeleteApps { package_names } => {
            transfer::share_delete_apps(ctx, package_names).map(Some)
        }
        JobKind::SetTraffic { traffic_type } => phones
            .set_traffic(phone_of(req)?, traffic_type)
            .map(|()| None),
        JobKind::UpdateBandwidth { band_width_size } => phones
            .update_bandwidth(&req.server_id, *band_width_size)
            .map(|()| None),
        JobKind::RestartEncodeServer => restart_encoder(ctx, &req.server_id).map(|()| None),
        JobKind::RestartServer => ctx.phones.restart_server(&req.server_id).map(Some),
        JobKind::DeleteServer => delete_server(ctx, &req.server_id).map(Some),
        JobKind::ExpandVolume { disk_gb } => {
            phones.expand_volume(phone_of(req)?, *disk_gb).map(Some)
        }
        JobKind::ChangeFlavor { flavor, .. } => {
            phones.change_flavor(&req.server_id, flavor).map(Some)
        }
        JobKind::CreateImage { object, .. } => {
            transfer::create_image(ctx, phone_of(req)?, object).map(Some)
        }
        JobKind::CreateServer { server } => create_server(ctx, server).map(Some),
        JobKind::AttachShareFs { fs } => phones.attach_share_fs(&req.server_id, fs).map(Some),
        JobKind::DetachShareFs { fs_id } => phones.detach_share_fs(&req.server_id, fs_id).map(Some),
    }
}

/// Starts the server's encoding container afresh from the server's image,
/// fetched first when it comes from the object store (a custom image the
/// server's phones have not imported yet).
fn restart_encoder(ctx: &JobContext<'_>, server_id: &str) -> Result<(), JobFailure> {
    let server = ctx.phones.server(server_id)?;
    let _using = ctx.phones.image_use();
    if server.flavor.encode_server_spec().is_some() {
        transfer::fetch_image(ctx, &server.image)?;
    }
    ctx.phones.restart_encoder(server_id)
}

/// Creates one phone of a recorded server from the server's image, with
/// the server's key when it has one.
fn create_phone(
    ctx: &JobContext<'_>,
    server_id: &str,
    phone: &PhoneSpec,
) -> Result<(), JobFailure> {
    let phones = ctx.phones;
    {
        let server = phones.server(server_id)?;
        let _using = phones.image_use();
        transfer::fetch_image(ctx, &server.image)?;
        phones.create(server_id, phone)?;
    }
    // The key as it is now: a keypair change during the image's download
    // did not see this phone yet.
    install_server_key(ctx, &phone.phone_id)
}

/// Makes a whole server on this host ([`JobKind::CreateServer`]): the
/// record, the host's `authorized_keys`, the encoding server, then the
/// phones, `ctx.parallel_creates` at once. Every phone is tried; the job
/// fails with the first failure's code when any could not be made.
fn create_server(ctx: &JobContext<'_>, server: &CreateServer) -> Result<String, JobFailure> {
    ctx.phones.put_server(server)?;
    write_authorized_keys(ctx)?;
    if server.flavor.encode_server_spec().is_some() {
        restart_encoder(ctx, &server.server_id)?;
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(Vec::new());
    let workers = ctx.parallel_creates.clamp(1, server.phones.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(phone) = server.phones.get(i) else {
                    break;
                };
                // Before any job of the phone (a switch's phone may be
                // sent jobs while it is made).
                let _held = ctx.phones.hold(&phone.phone_id);
                if let Err(e) = create_phone(ctx, &server.server_id, phone) {
                    tracing::warn!(phone_id = %phone.phone_id, error = %e, "phone not created");
                    failed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((i, phone.phone_id.clone(), e));
                }
            });
        }
    });
    let mut failed = failed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    failed.sort_by_key(|(i, _, _)| *i);
    let made = server.phones.len() - failed.len();
    let Some((_, _, first)) = failed.first() else {
        return Ok(format!(
            "server {} made on this host, {made} phones created",
            server.server_id
        ));
    };
    let names: Vec<String> = failed
        .iter()
        .map(|(_, id, e)| format!("{id} ({})", e.msg))
        .collect();
    Err(JobFailure::new(
        &first.code,
        format!(
            "{made} of {} phones created; not created: {}",
            server.phones.len(),
            names.join("; ")
        ),
    ))
}

/// A public key as the reference accepts it: one line, at most 16 KiB.
fn checked_key(public_key: &str) -> Result<&str, JobFailure> {
    let key = public_key.trim();
    if key.is_empty() || key.contains('\n') || key.len() > 16 * 1024 {
        return Err(JobFailure::new("CPS.0118", "public key is invalid"));
    }
    Ok(key)
}

/// Writes the key into the phone's `/data/misc/adb/adb_keys` (where adbd
/// reads it), beneath the phone's root, never through a link the phone made.
fn install_key(ctx: &JobContext<'_>, phone: &str, public_key: &str) -> Result<(), JobFailure> {
    let key = checked_key(public_key)?;
    transfer::write_into_phone(
        &ctx.phones.rootfs(phone)?,
        "data/misc/adb/adb_keys",
        format!("{key}\n").as_bytes(),
        0o644,
    )
}

/// Puts the current key of the phone's server, when it has one, into the
/// phone's `adb_keys`: for a new phone, one whose `/data` was made anew
/// (a reset) and one whose `/data` is another phone's (a migration's
/// target, on a server that may have another key).
pub(super) fn install_server_key(ctx: &JobContext<'_>, phone: &str) -> Result<(), JobFailure> {
    let server_id = ctx.phones.record(phone)?.server_id;
    match ctx.phones.server(&server_id)?.public_key.as_deref() {
        Some(key) if !key.trim().is_empty() => install_key(ctx, phone, key),
        _ => Ok(()),
    }
}

/// Keypair change of a server (or of one phone): the key goes into each
/// phone and, for a server, is recorded for its future phones and replaces
/// its earlier key in the host's `authorized_keys`.
fn update_keypair(
    ctx: &JobContext<'_>,
    req: &JobRequest,
    public_key: &str,
) -> Result<String, JobFailure> {
    let key = checked_key(public_key)?;
    let phones = match &req.phone_id {
        Some(p) => vec![p.clone()],
        None => {
            let mut server = ctx.phones.server(&req.server_id)?;
            server.public_key = Some(key.to_string());
            ctx.phones.put_server(&server)?;
            write_authorized_keys(ctx)?;
            ctx.phones.phones_of(&req.server_id)
        }
    };
    // Every phone is tried: one that cannot take the key does not keep the
    // others on the old one.
    let failed: Vec<(String, JobFailure)> = phones
        .iter()
        .filter_map(|p| {
            // A server's change takes each phone between its own jobs (a
            // phone's change runs as one of them, the phone held already).
            let _held = req.phone_id.is_none().then(|| ctx.phones.hold(p));
            install_key(ctx, p, key).err().map(|e| (p.clone(), e))
        })
        .collect();
    let Some((_, first)) = failed.first() else {
        return Ok(format!("key installed in {} phones", phones.len()));
    };
    let names: Vec<String> = failed
        .iter()
        .map(|(p, e)| format!("{p} ({})", e.msg))
        .collect();
    Err(JobFailure::new(
        &first.code,
        format!(
            "key installed in {} of {} phones; not in {}",
            phones.len() - failed.len(),
            phones.len(),
            names.join(", ")
        ),
    ))
}

/// Writes the host's `authorized_keys` anew: the current key of each server
/// on the host, and nothing else (a replaced key or a deleted server's key
/// opens nothing any more).
fn write_authorized_keys(ctx: &JobContext<'_>) -> Result<(), JobFailure> {
    write_host_keys(ctx.phones, ctx.authorized_keys)
}

/// [`write_authorized_keys`] to `path` from `phones`' servers.
pub fn write_host_keys(phones: &Phones, path: &Path) -> Result<(), JobFailure> {
    let mut keys = std::collections::BTreeSet::new();
    for id in phones.server_ids() {
        if let Some(key) = phones
            .server(&id)?
            .public_key
            .as_deref()
            .and_then(|k| checked_key(k).ok())
        {
            keys.insert(key.to_string());
        }
    }
    let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| JobFailure::internal(format!("create {}: {e}", dir.display())))?;
    }
    super::jobstore::write_atomic(path, text.as_bytes())
        .map_err(|e| JobFailure::internal(format!("write {}: {e}", path.display())))
}

/// Removes `image`, which a phone has just left (by a reset to another
/// image or its deletion), if it was imported from the object store and
/// nothing on the host uses it any more; the `execute_msg` that says so.
/// The job's own work is done: a failed removal is logged, not a failure.
fn drop_left_image(ctx: &JobContext<'_>, image: ImageRef) -> Option<String> {
    match ctx.phones.drop_unused_images(&[image]) {
        Ok(removed) if removed.is_empty() => None,
        Ok(removed) => Some(format!("unused image removed: {}", removed.join(", "))),
        Err(e) => {
            tracing::warn!(error = %e.msg, "unused image kept");
            None
        }
    }
}

/// Releases a server from this host ([`JobKind::DeleteServer`]).
fn delete_server(ctx: &JobContext<'_>, server_id: &str) -> Result<String, JobFailure> {
    let (deleted, images) = ctx.phones.delete_server(server_id)?;
    write_authorized_keys(ctx)?;
    let mut msg = format!("server {server_id} released, {deleted} phones deleted");
    if !images.is_empty() {
        msg.push_str(&format!("; unused images removed: {}", images.join(", ")));
    }
    // The sharepool belongs to the host's servers: the next buyer of the
    // host starts with an empty one, of the configured size.
    if ctx.phones.server_ids().is_empty() {
        let removed = transfer::empty_sharepool(ctx)?;
        ctx.phones.reset_share_limit()?;
        msg.push_str(&format!("; sharepool emptied ({removed} entries)"));
    }
    Ok(msg)
}
