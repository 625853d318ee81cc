//! The sharepool's reports in the reference's `execute_msg` forms: the
//! capacity as `Size Used Avail Use%` (df-style, e.g. `8.9G 323M 8.2G 4%`)
//! with the total max size (`50G`), and a directory listing of
//! `[size time name]` lines (`4096 Apr 15 09:49 com.tencent.mm`) paged by
//! offset and limit.

use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::{SharePaths, StorageError};

/// Sharepool space in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareUsage {
    /// The cap (`max_share_disk_size_g`), or the filesystem size if smaller.
    pub size: u64,
    pub used: u64,
    pub avail: u64,
    /// The configured cap.
    pub max: u64,
}

/// `share_base_capacity` and `share_base_max_size` as the reference shows.
pub fn capacity_report(u: &ShareUsage) -> (String, String) {
    let pct = if u.size == 0 {
        0
    } else {
        // df rounds the use percentage up.
        (u.used * 100).div_ceil(u.size)
    };
    (
        format!(
            "{} {} {} {}%",
            human(u.size),
            human(u.used),
            human(u.avail),
            pct
        ),
        human(u.max),
    )
}

/// Bytes as df -h prints them: one decimal below 10, none above, with the
/// unit letter (`0`, `512`, `8.9G`, `323M`, `50G`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut v = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        v /= 1024.0;
        unit = u;
        if v < 1024.0 {
            break;
        }
    }
    if v < 10.0 {
        let r = (v * 10.0).ceil() / 10.0;
        if r < 10.0 {
            return format!("{r:.1}{unit}");
        }
    }
    format!("{}{unit}", v.ceil() as u64)
}

/// One page of a sharepool directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShareListing {
    pub total: usize,
    pub count: usize,
    pub files: Vec<String>,
}

/// Resolves a sharepool path (`/files/...` or `/apps/...`, relative to the
/// sharepool root) to a host path, refusing `..`, `//` and anything else.
pub fn resolve_share_path(paths: &SharePaths, rel: &str) -> Result<PathBuf, StorageError> {
    let bad = || StorageError::BadSharePath(rel.to_string());
    if !rel.starts_with('/') || rel.contains("//") || rel.contains('\0') {
        return Err(bad());
    }
    let mut comps = Path::new(rel).components();
    comps.next(); // the root
    let base = match comps.next() {
        Some(Component::Normal(n)) if n == "files" => &paths.files,
        Some(Component::Normal(n)) if n == "apps" => &paths.apps,
        _ => return Err(bad()),
    };
    let mut out = base.clone();
    for c in comps {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// Lists a sharepool directory, sorted by name, `limit` entries from
/// `offset`, each as `size Mon DD HH:MM name` (UTC).
pub fn list_share_dir(
    paths: &SharePaths,
    rel: &str,
    offset: usize,
    limit: usize,
) -> Result<ShareListing, StorageError> {
    let dir = resolve_share_path(paths, rel)?;
    let rd = std::fs::read_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
    let mut entries = Vec::new();
    for e in rd {
        let e = e.map_err(|e| StorageError::io("list", &dir, e))?;
        let md = e
            .metadata()
            .map_err(|err| StorageError::io("stat", e.path(), err))?;
        entries.push((
            e.file_name().to_string_lossy().into_owned(),
            md.len(),
            md.mtime(),
        ));
    }
    entries.sort();
    let total = entries.len();
    let files: Vec<String> = entries
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(name, size, mtime)| format!("{size} {} {name}", ls_time(mtime)))
        .collect();
    Ok(ShareListing {
        total,
        count: files.len(),
        files,
    })
}

/// `Apr 15 09:49` for a unix time (UTC).
pub fn ls_time(unix: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (_, m, d) = civil_from_days(days);
    format!(
        "{} {:02} {:02}:{:02}",
        MONTHS[(m - 1) as usize],
        d,
        secs / 3600,
        (secs % 3600) / 60
    )
}

/// Gregorian (year, month, day) of days since 1970-01-01 (Hinnant's method).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_matches_reference_form() {
        let g = 1u64 << 30;
        let u = ShareUsage {
            size: 9_556_302_000, // 8.9G
            used: 323 << 20,
            avail: 8_804_682_000, // 8.2G
            max: 50 * g,
        };
        let (cap, max) = capacity_report(&u);
        assert_eq!(cap, "8.9G 323M 8.2G 4%");
        assert_eq!(max, "50G");
        assert_eq!(human(0), "0");
        assert_eq!(human(1024), "1.0K");
    }

    #[test]
    fn ls_time_formats_utc() {
        // 2020-04-15T09:49:00Z
        assert_eq!(ls_time(1_586_944_140), "Apr 15 09:49");
        assert_eq!(ls_time(0), "Jan 01 00:00");
    }

    #[test]
    fn listing_pages_and_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let paths = SharePaths {
            files: d.path().join("files"),
            apps: d.path().join("apps"),
        };
        std::fs::create_dir_all(&paths.files).unwrap();
        std::fs::create_dir_all(&paths.apps).unwrap();
        for n in ["a", "b", "c"] {
            std::fs::write(paths.files.join(n), b"12345").unwrap();
        }
        let page = list_share_dir(&paths, "/files", 1, 1).unwrap();
        assert_eq!((page.total, page.count), (3, 1));
        assert!(page.files[0].starts_with("5 "), "{:?}", page.files);
        assert!(page.files[0].ends_with(" b"), "{:?}", page.files);
        for bad in ["/files/../x", "files", "/other", "//files", "/files/./a/.."] {
            assert!(resolve_share_path(&paths, bad).is_err(), "{bad}");
        }
    }
}
