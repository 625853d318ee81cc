//! Field rules of the reference, one validator per kind of value, with the
//! reference's limits as named constants.

// Validators answer only valid or not; the caller names the field's CPS code.
#![allow(clippy::result_unit_err)]

use std::collections::BTreeMap;

use cph_agent::protocol::{JobKind, ObjectRef};

use super::ApiError;

pub const OBJECT_PATH_MAX: usize = 1024;
pub const FILE_PATH_MAX: usize = 4096;
pub const PROPERTY_MAX: usize = 2048;
pub const SHELL_MAX: usize = 1024;
pub const SYNC_SHELL_TIMEOUT_MS: u64 = 2000;

/// A 32-byte-at-most id of hex digits, letters and dashes.
pub fn is_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// A keypair's name as the key pair service allows it: 1 to 64 ASCII
/// letters, digits, `-` and `_`.
pub fn is_keypair_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Letters, digits, `_` and `-`, 1..=max characters.
pub fn name(s: &str, max: usize) -> Result<(), ()> {
    let n = s.chars().count();
    if n == 0
        || n > max
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(());
    }
    Ok(())
}

/// OBS bucket: 3..=63 of lower-case letters, digits, `-` and `.`.
pub fn bucket(s: &str) -> Result<(), ApiError> {
    let ok = (3..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    ok.then_some(()).ok_or(ApiError::BucketName)
}

/// OBS object path: up to 1,024 of letters, digits, `.`, `/`, `-`, `_`, `+`, `#`, `=`; no `..`.
pub fn object_path(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= OBJECT_PATH_MAX
        && !s.split('/').any(|seg| seg == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./-_+#=".contains(c));
    ok.then_some(()).ok_or(ApiError::ObjectPath)
}

/// A path of `batch-storage`'s include or exclude list: starts with `/`, at
/// most 4,096 bytes of letters, digits, `.`, `/`, `-`, `_`, `+`, `#`, `=`;
/// no `..` segment. A final `*` names every entry beginning with what comes
/// before it, as in the reference's own example (`/data/app/com.xx.xx-*`).
pub fn storage_path(s: &str) -> Result<(), ApiError> {
    let body = s.strip_suffix('*').unwrap_or(s);
    let ok = s.starts_with('/')
        && s.len() <= FILE_PATH_MAX
        && !body.split('/').any(|seg| seg == "..")
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "./-_+#=".contains(c));
    ok.then_some(()).ok_or(ApiError::FilePaths)
}

/// A [`storage_path`] in `/data` or `/cache`, the directories a phone's data
/// may be exported from.
pub fn export_path(s: &str) -> bool {
    let top = s.trim_start_matches('/').split('/').next().unwrap_or("");
    storage_path(s).is_ok() && (top == "data" || top == "cache")
}

/// An absolute file path: starts with `/`, at most 4,096 bytes of letters,
/// digits, `.`, `/`, `-`, space, `_`, `=`; no `..` segment.
pub fn file_path(s: &str) -> Result<(), ApiError> {
    let ok = s.starts_with('/')
        && s.len() <= FILE_PATH_MAX
        && !s.split('/').any(|seg| seg == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./- _=".contains(c));
    ok.then_some(()).ok_or(ApiError::FilePaths)
}

/// A sharepool directory to list: starts with `/`, letters, digits, `.`,
/// `+`, `-`, `_`, `/` and `=`, no `//` nor `../`. The reference refuses a
/// path of slashes only; `/` alone, the top of the shared files, is taken.
pub fn share_dir(s: &str) -> Result<(), ApiError> {
    let ok = s.starts_with('/')
        && s.len() <= FILE_PATH_MAX
        && !s.contains("//")
        && !s.contains("../")
        && !s.split('/').any(|seg| seg == "..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./+-_=".contains(c));
    ok.then_some(()).ok_or(ApiError::Path)
}

/// A shared application's package name: at most 128 bytes of letters,
/// digits, `_` and `.`, at least one `.`, not beginning with a digit or
/// `_`, not ending with `.`.
pub fn share_package(s: &str) -> Result<(), ApiError> {
    let ok = s.len() <= 128
        && s.contains('.')
        && !s.ends_with('.')
        && !s.starts_with(|c: char| c.is_ascii_digit() || c == '_' || c == '.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    ok.then_some(()).ok_or(ApiError::PackageName)
}

/// A property JSON string: an object of at most 2,048 bytes whose values are
/// strings, numbers or booleans, each name one of the reference's attributes
/// (CPS.0163) with a value its rule takes (the attribute's code, see
/// [`cph_agent::property::check`]).
pub fn property(s: &str) -> Result<BTreeMap<String, String>, ApiError> {
    if s.len() > PROPERTY_MAX {
        return Err(ApiError::Property("longer than 2048 bytes".into()));
    }
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|_| ApiError::Property("not a json object".into()))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::Property("not a json object".into()))?;
    let refused = |r: cph_agent::property::Refused| match r.code {
        "CPS.0163" => ApiError::PropertyUnsupported(r.message),
        code => ApiError::PropertyInvalid(code, r.message),
    };
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        if k.is_empty() || k.len() > 128 {
            return Err(ApiError::Property(format!("name {k} is invalid")));
        }
        let text = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            // The name is judged first (CPS.0163), then the value, which is
            // not one (the attribute's code).
            _ => return Err(refused(cph_agent::property::not_a_value(k))),
        };
        cph_agent::property::check(k, &text).map_err(refused)?;
        out.insert(k.clone(), text);
    }
    Ok(out)
}

/// An Android package name: dot-separated identifiers.
pub fn package(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !seg.starts_with(|c: char| c.is_ascii_digit())
        });
    ok.then_some(()).ok_or(ApiError::PackageName)
}

fn obs_url(s: &str) -> Result<ObjectRef, ApiError> {
    let rest = s.strip_prefix("obs://").ok_or(ApiError::Content)?;
    let (b, k) = rest.split_once('/').ok_or(ApiError::Content)?;
    bucket(b)?;
    object_path(k)?;
    Ok(ObjectRef {
        bucket: b.into(),
        key: k.into(),
    })
}

/// The ADB `command` + `content` pair of `.../phones/commands` (or
/// `sync-commands` when `sync`) as a typed job.
pub fn adb_command(command: &str, content: &str, sync: bool) -> Result<JobKind, ApiError> {
    if sync {
        if command != "shell" {
            return Err(ApiError::Command);
        }
        if content.is_empty() || content.len() > SHELL_MAX {
            return Err(ApiError::Content);
        }
        return Ok(JobKind::SyncShell {
            command: content.into(),
            timeout_ms: SYNC_SHELL_TIMEOUT_MS,
        });
    }
    // The reference's length limits of `content`: 1,024 bytes, 8,100 for
    // an install-multiple (at most 50 APKs).
    let max = if command == "install-multiple" {
        8_100
    } else {
        1_024
    };
    if content.len() > max {
        return Err(ApiError::Content);
    }
    match command {
        "push" => {
            let o = obs_url(content.trim())?;
            if !o.key.ends_with(".tar") {
                return Err(ApiError::Content);
            }
            Ok(JobKind::Push { object: o })
        }
        "install" | "install-multiple" => {
            let mut flags = Vec::new();
            let mut objects = Vec::new();
            for w in content.split_whitespace() {
                if w.starts_with('-') {
                    if !cph_agent::protocol::INSTALL_FLAGS.contains(&w) {
                        return Err(ApiError::Content);
                    }
                    flags.push(w.to_string());
                } else {
                    let o = obs_url(w)?;
                    if !o.key.ends_with(".apk") {
                        return Err(ApiError::NotApk);
                    }
                    objects.push(o);
                }
            }
            if objects.is_empty()
                || objects.len() > cph_agent::protocol::MAX_APKS
                || (command == "install" && objects.len() != 1)
            {
                return Err(ApiError::Content);
            }
            Ok(JobKind::Install { flags, objects })
        }
        "uninstall" => {
            let mut flags = Vec::new();
            let mut pkg = None;
            for w in content.split_whitespace() {
                if w == "-k" {
                    flags.push(w.to_string());
                } else if pkg.is_none() {
                    package(w)?;
                    pkg = Some(w.to_string());
                } else {
                    return Err(ApiError::Content);
                }
            }
            Ok(JobKind::Uninstall {
                flags,
                package: pkg.ok_or(ApiError::Content)?,
            })
        }
        "shell" => {
            if content.is_empty() || content.len() > SHELL_MAX {
                return Err(ApiError::Content);
            }
            Ok(JobKind::Shell {
                command: content.into(),
            })
        }
        _ => Err(ApiError::Command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_refuse_dot_dot() {
        assert!(file_path("/data/app").is_ok());
        assert!(file_path("/data/../etc").is_err());
        assert!(object_path("a/../b.tar").is_err());
        assert!(object_path("my_apps/test.tar").is_ok());
        assert!(storage_path("/data/app/com.xx.xx-*").is_ok());
        assert!(storage_path("/data/a+b#c=d").is_ok());
        assert!(storage_path("/data/*/x").is_err());
        assert!(storage_path("/data/../*").is_err());
        assert!(storage_path("data/app").is_err());
        assert!(export_path("/data/app/com.xx.xx-*"));
        assert!(export_path("/cache"));
        assert!(!export_path("/data*"));
        assert!(!export_path("/system/app"));
        assert!(!export_path("/"));
    }

    #[test]
    fn share_directories_and_packages_follow_the_reference() {
        for ok in ["/", "/data/data", "/a+b=c/d_e-f.g", "/data/"] {
            assert!(share_dir(ok).is_ok(), "{ok}");
        }
        for bad in [
            "//", "///", "data", "/a//b", "/a/../b", "/a/..", "/a b", "/a*",
        ] {
            assert!(share_dir(bad).is_err(), "{bad}");
        }
        for ok in ["com.example.app", "a.b", "Com_x.y2"] {
            assert!(share_package(ok).is_ok(), "{ok}");
        }
        let long = format!("a.{}", "b".repeat(127));
        for bad in [
            "noperiod",
            "1a.b",
            "_a.b",
            "a.b.",
            ".a.b",
            "a-b.c",
            long.as_str(),
        ] {
            assert!(share_package(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn adb_commands_parse() {
        assert!(matches!(
            adb_command("install", "-r obs://bucket-a/x.apk", false),
            Ok(JobKind::Install { .. })
        ));
        assert_eq!(
            adb_command("install", "obs://bucket-a/x.zip", false),
            Err(ApiError::NotApk)
        );
        // The API takes exactly the options the agent passes to `pm install`.
        for flag in cph_agent::protocol::INSTALL_FLAGS {
            let content = format!("{flag} obs://bucket-a/x.apk");
            assert!(adb_command("install", &content, false).is_ok(), "{flag}");
        }
        assert_eq!(
            adb_command("install", "-p obs://bucket-a/x.apk", false),
            Err(ApiError::Content)
        );
        assert_eq!(adb_command("rm", "x", false), Err(ApiError::Command));
        let apks = |n: usize| {
            (0..n)
                .map(|i| format!("obs://bucket-a/a{i}.apk"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(adb_command("install-multiple", &apks(50), false).is_ok());
        assert_eq!(
            adb_command("install-multiple", &apks(51), false),
            Err(ApiError::Content)
        );
        let long = format!("obs://bucket-a/{}.tar", "a".repeat(1_010));
        assert_eq!(adb_command("push", &long, false), Err(ApiError::Content));
        assert!(matches!(
            adb_command("uninstall", "com.example.app", false),
            Ok(JobKind::Uninstall { .. })
        ));
        assert_eq!(
            adb_command("uninstall", "1com", false),
            Err(ApiError::PackageName)
        );
    }

    #[test]
    fn buckets_follow_the_rules() {
        assert!(bucket("bucket-a").is_ok());
        assert!(bucket("bucketA").is_err());
        assert!(bucket("ab").is_err());
    }
}
