//! Checking an APK before it is installed: a zip archive holding an
//! `AndroidManifest.xml`, whose `package` attribute names the application
//! (and whose `versionName`, or else `versionCode`, its version).
//!
//! Real APKs carry the manifest as Android binary XML (AXML): a chunked
//! format with a string pool and element chunks whose attributes point into
//! it. Hand-made test packages carry a plain-text manifest. Both are read.

use std::io::{Read, Seek};

/// Why a file is not an installable APK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApkError {
    #[error("not a zip archive: {0}")]
    NotZip(String),
    #[error("the archive has no AndroidManifest.xml")]
    NoManifest,
    #[error("AndroidManifest.xml is malformed: {0}")]
    BadManifest(&'static str),
    #[error("AndroidManifest.xml names no package")]
    NoPackage,
    #[error("package name {0:?} is invalid")]
    BadPackage(String),
}

/// The manifest may not be larger than this (real ones are a few KiB).
const MANIFEST_MAX: u64 = 16 << 20;

/// What an APK's manifest says of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub package: String,
    /// `versionName`, or `versionCode` when it has no name.
    pub version: Option<String>,
}

/// Reads the manifest of the APK in `file`; its package name is checked.
pub fn read_manifest<R: Read + Seek>(file: R) -> Result<Manifest, ApkError> {
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ApkError::NotZip(e.to_string()))?;
    let entry = zip
        .by_name("AndroidManifest.xml")
        .map_err(|_| ApkError::NoManifest)?;
    let mut bytes = Vec::new();
    entry
        .take(MANIFEST_MAX)
        .read_to_end(&mut bytes)
        .map_err(|e| ApkError::NotZip(format!("reading AndroidManifest.xml: {e}")))?;
    let m = manifest(&bytes)?;
    if valid_package(&m.package) {
        Ok(m)
    } else {
        Err(ApkError::BadPackage(m.package))
    }
}

/// Reads the package name of the APK in `file`.
pub fn package_name<R: Read + Seek>(file: R) -> Result<String, ApkError> {
    read_manifest(file).map(|m| m.package)
}

/// `a.b.c`: at least two dot-separated segments of `[A-Za-z0-9_]`, each
/// starting with a letter (Android's rule).
pub fn valid_package(name: &str) -> bool {
    let segments: Vec<&str> = name.split('.').collect();
    name.len() <= 255
        && segments.len() >= 2
        && segments.iter().all(|s| {
            s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// The `package` attribute of the manifest, binary or text.
pub fn manifest_package(bytes: &[u8]) -> Result<String, ApkError> {
    manifest(bytes).map(|m| m.package)
}

/// The manifest's package and version, binary or text.
pub fn manifest(bytes: &[u8]) -> Result<Manifest, ApkError> {
    if bytes.len() >= 8 && u16_at(bytes, 0) == Some(RES_XML_TYPE) {
        return axml_manifest(bytes);
    }
    let text = String::from_utf8_lossy(bytes);
    let start = text
        .find("<manifest")
        .ok_or(ApkError::BadManifest("no <manifest> element"))?;
    let element = &text[start..];
    let element = &element[..element.find('>').unwrap_or(element.len())];
    let package = text_attr(element, "package")?.ok_or(ApkError::NoPackage)?;
    let version = match text_attr(element, "android:versionName")? {
        Some(v) => Some(v),
        None => text_attr(element, "android:versionCode")?,
    };
    Ok(Manifest { package, version })
}

/// The value of attribute `name` in a text element, quoted either way.
fn text_attr(element: &str, name: &str) -> Result<Option<String>, ApkError> {
    for quote in ['"', '\''] {
        let key = format!("{name}={quote}");
        let found = element.match_indices(&key).find(|(i, _)| {
            element[..*i]
                .chars()
                .next_back()
                .is_some_and(char::is_whitespace)
        });
        if let Some((i, _)) = found {
            let rest = &element[i + key.len()..];
            let end = rest
                .find(quote)
                .ok_or(ApkError::BadManifest("unterminated attribute"))?;
            return Ok(Some(rest[..end].to_string()));
        }
    }
    Ok(None)
}

const RES_XML_TYPE: u16 = 0x0003;
const RES_STRING_POOL_TYPE: u16 = 0x0001;
const RES_XML_START_ELEMENT_TYPE: u16 = 0x0102;
const RES_XML_RESOURCE_MAP_TYPE: u16 = 0x0180;
/// `android:versionCode` and `android:versionName`, matched by resource id
/// when a build stripped the attribute names.
const ATTR_VERSION_CODE: u32 = 0x0101_021b;
const ATTR_VERSION_NAME: u32 = 0x0101_021c;
/// `Res_value` data types of integers.
const TYPE_INT_DEC: u8 = 0x10;
const TYPE_INT_HEX: u8 = 0x11;
const UTF8_FLAG: u32 = 1 << 8;
/// `Res_value` data type of a string reference.
const TYPE_STRING: u8 = 0x03;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The string pool of an AXML document.
struct StringPool<'a> {
    chunk: &'a [u8],
    count: usize,
    utf8: bool,
    strings_start: usize,
}

impl<'a> StringPool<'a> {
    fn parse(chunk: &'a [u8]) -> Result<Self, ApkError> {
        let bad = ApkError::BadManifest("string pool header");
        let count = u32_at(chunk, 8).ok_or(bad.clone())? as usize;
        let flags = u32_at(chunk, 16).ok_or(bad.clone())?;
        let strings_start = u32_at(chunk, 20).ok_or(bad.clone())? as usize;
        let header = u16_at(chunk, 2).ok_or(bad.clone())? as usize;
        if header + count * 4 > chunk.len() || strings_start > chunk.len() {
            return Err(bad);
        }
        Ok(StringPool {
            chunk,
            count,
            utf8: flags & UTF8_FLAG != 0,
            strings_start,
        })
    }

    fn get(&self, index: u32) -> Option<String> {
        let index = index as usize;
        if index >= self.count {
            return None;
        }
        let header = u16_at(self.chunk, 2)? as usize;
        let offset = u32_at(self.chunk, header + index * 4)? as usize;
        let at = self.strings_start.checked_add(offset)?;
        if self.utf8 {
            // UTF-16 length, then UTF-8 length, each 1 or 2 bytes.
            let (_, at) = utf8_len(self.chunk, at)?;
            let (len, at) = utf8_len(self.chunk, at)?;
            let bytes = self.chunk.get(at..at + len)?;
            Some(String::from_utf8_lossy(bytes).into_owned())
        } else {
            let mut len = u16_at(self.chunk, at)? as usize;
            let mut at = at + 2;
            if len & 0x8000 != 0 {
                len = ((len & 0x7fff) << 16) | u16_at(self.chunk, at)? as usize;
                at += 2;
            }
            let units: Option<Vec<u16>> =
                (0..len).map(|i| u16_at(self.chunk, at + i * 2)).collect();
            Some(String::from_utf16_lossy(&units?))
        }
    }
}

fn utf8_len(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let first = *b.get(at)? as usize;
    if first & 0x80 != 0 {
        let second = *b.get(at + 1)? as usize;
        Some((((first & 0x7f) << 8) | second, at + 2))
    } else {
        Some((first, at + 1))
    }
}

fn axml_manifest(doc: &[u8]) -> Result<Manifest, ApkError> {
    let truncated = ApkError::BadManifest("truncated chunk");
    let first_header = u16_at(doc, 2).ok_or(truncated.clone())? as usize;
    let mut at = first_header;
    let mut pool: Option<StringPool<'_>> = None;
    let mut ids: &[u8] = &[];
    while at + 8 <= doc.len() {
        let kind = u16_at(doc, at).ok_or(truncated.clone())?;
        let size = u32_at(doc, at + 4).ok_or(truncated.clone())? as usize;
        if size < 8 || at + size > doc.len() {
            return Err(truncated);
        }
        let chunk = &doc[at..at + size];
        match kind {
            RES_STRING_POOL_TYPE if pool.is_none() => pool = Some(StringPool::parse(chunk)?),
            RES_XML_RESOURCE_MAP_TYPE => ids = &chunk[8..],
            RES_XML_START_ELEMENT_TYPE => {
                let pool = pool
                    .as_ref()
                    .ok_or(ApkError::BadManifest("element before the string pool"))?;
                return manifest_element(chunk, pool, ids);
            }
            _ => {}
        }
        at += size;
    }
    Err(ApkError::BadManifest("no element"))
}

/// The first element must be `<manifest>`; its `package` and version.
/// `ids` is the resource map: the resource id of each attribute name.
fn manifest_element(chunk: &[u8], pool: &StringPool<'_>, ids: &[u8]) -> Result<Manifest, ApkError> {
    let bad = ApkError::BadManifest("start element");
    let header = u16_at(chunk, 2).ok_or(bad.clone())? as usize;
    let name = u32_at(chunk, header + 4).ok_or(bad.clone())?;
    if pool.get(name).as_deref() != Some("manifest") {
        return Err(ApkError::BadManifest("root element is not <manifest>"));
    }
    let attr_start = u16_at(chunk, header + 8).ok_or(bad.clone())? as usize;
    let attr_size = u16_at(chunk, header + 10).ok_or(bad.clone())? as usize;
    let attr_count = u16_at(chunk, header + 12).ok_or(bad.clone())? as usize;
    if attr_size < 20 {
        return Err(bad);
    }
    let (mut package, mut version_name, mut version_code) = (None, None, None);
    for i in 0..attr_count {
        let a = header + attr_start + i * attr_size;
        let name = u32_at(chunk, a + 4).ok_or(bad.clone())?;
        let raw = u32_at(chunk, a + 8).ok_or(bad.clone())?;
        let data_type = *chunk.get(a + 15).ok_or(bad.clone())?;
        let data = u32_at(chunk, a + 16).ok_or(bad.clone())?;
        let string = || {
            let index = if raw != u32::MAX {
                raw
            } else if data_type == TYPE_STRING {
                data
            } else {
                return None;
            };
            pool.get(index)
        };
        let id = u32_at(ids, name as usize * 4);
        match (pool.get(name).as_deref(), id) {
            (Some("package"), _) => {
                package = Some(string().ok_or(ApkError::BadManifest("package is not a string"))?)
            }
            (Some("versionName"), _) | (_, Some(ATTR_VERSION_NAME)) => version_name = string(),
            (Some("versionCode"), _) | (_, Some(ATTR_VERSION_CODE))
                if matches!(data_type, TYPE_INT_DEC | TYPE_INT_HEX) =>
            {
                version_code = Some(data.to_string())
            }
            _ => {}
        }
    }
    Ok(Manifest {
        package: package.ok_or(ApkError::NoPackage)?,
        version: version_name.or(version_code),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Cursor, Write};

    /// A minimal binary manifest: `<manifest package="...">` with UTF-16 or
    /// UTF-8 strings, laid out as aapt writes it.
    pub fn axml(package: &str, utf8: bool) -> Vec<u8> {
        axml_doc(
            &["manifest", "package", package],
            &[(1, 2, TYPE_STRING, 2)],
            &[],
            utf8,
        )
    }

    /// A binary `<manifest>` of the strings `strings` (one is "manifest"),
    /// attributes `(name, raw, type, data)` and resource map `ids`.
    pub fn axml_doc(
        strings: &[&str],
        attrs: &[(u32, u32, u8, u32)],
        ids: &[u32],
        utf8: bool,
    ) -> Vec<u8> {
        let mut data = Vec::new();
        let mut offsets = Vec::new();
        for s in strings {
            offsets.push(data.len() as u32);
            if utf8 {
                data.push(s.chars().count() as u8);
                data.push(s.len() as u8);
                data.extend_from_slice(s.as_bytes());
                data.push(0);
            } else {
                let units: Vec<u16> = s.encode_utf16().collect();
                data.extend_from_slice(&(units.len() as u16).to_le_bytes());
                for u in units {
                    data.extend_from_slice(&u.to_le_bytes());
                }
                data.extend_from_slice(&[0, 0]);
            }
        }
        while data.len() % 4 != 0 {
            data.push(0);
        }
        let header = 28usize;
        let strings_start = header + offsets.len() * 4;
        let mut pool = Vec::new();
        pool.extend_from_slice(&RES_STRING_POOL_TYPE.to_le_bytes());
        pool.extend_from_slice(&(header as u16).to_le_bytes());
        pool.extend_from_slice(&((strings_start + data.len()) as u32).to_le_bytes());
        pool.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
        pool.extend_from_slice(&0u32.to_le_bytes());
        pool.extend_from_slice(&(if utf8 { UTF8_FLAG } else { 0 }).to_le_bytes());
        pool.extend_from_slice(&(strings_start as u32).to_le_bytes());
        pool.extend_from_slice(&0u32.to_le_bytes());
        for o in offsets {
            pool.extend_from_slice(&o.to_le_bytes());
        }
        pool.extend_from_slice(&data);

        let mut map = Vec::new();
        if !ids.is_empty() {
            map.extend_from_slice(&RES_XML_RESOURCE_MAP_TYPE.to_le_bytes());
            map.extend_from_slice(&8u16.to_le_bytes());
            map.extend_from_slice(&((8 + ids.len() * 4) as u32).to_le_bytes());
            for id in ids {
                map.extend_from_slice(&id.to_le_bytes());
            }
        }

        let mut el = Vec::new();
        el.extend_from_slice(&RES_XML_START_ELEMENT_TYPE.to_le_bytes());
        el.extend_from_slice(&16u16.to_le_bytes());
        el.extend_from_slice(&((16 + 20 + 20 * attrs.len()) as u32).to_le_bytes());
        el.extend_from_slice(&1u32.to_le_bytes()); // line
        el.extend_from_slice(&u32::MAX.to_le_bytes()); // comment
        el.extend_from_slice(&u32::MAX.to_le_bytes()); // ns
        let element = strings.iter().position(|s| *s == "manifest").unwrap_or(0);
        el.extend_from_slice(&(element as u32).to_le_bytes()); // name: "manifest"
        el.extend_from_slice(&20u16.to_le_bytes()); // attributeStart
        el.extend_from_slice(&20u16.to_le_bytes()); // attributeSize
        el.extend_from_slice(&(attrs.len() as u16).to_le_bytes()); // attributeCount
        el.extend_from_slice(&[0; 6]); // id, class, style
        for (name, raw, data_type, value) in attrs {
            el.extend_from_slice(&u32::MAX.to_le_bytes()); // attr ns
            el.extend_from_slice(&name.to_le_bytes());
            el.extend_from_slice(&raw.to_le_bytes());
            el.extend_from_slice(&8u16.to_le_bytes());
            el.push(0);
            el.push(*data_type);
            el.extend_from_slice(&value.to_le_bytes());
        }

        let mut doc = Vec::new();
        doc.extend_from_slice(&RES_XML_TYPE.to_le_bytes());
        doc.extend_from_slice(&8u16.to_le_bytes());
        doc.extend_from_slice(&((8 + pool.len() + map.len() + el.len()) as u32).to_le_bytes());
        doc.extend_from_slice(&pool);
        doc.extend_from_slice(&map);
        doc.extend_from_slice(&el);
        doc
    }

    pub fn zip_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut out);
            for (name, data) in files {
                w.start_file(*name, zip::write::SimpleFileOptions::default())
                    .expect("start file");
                w.write_all(data).expect("write");
            }
            w.finish().expect("finish zip");
        }
        out.into_inner()
    }

    #[test]
    fn binary_manifests_in_both_encodings() {
        for utf8 in [false, true] {
            let apk = zip_with(&[
                ("AndroidManifest.xml", &axml("com.example.game", utf8)),
                ("classes.dex", b"dex\n035\0"),
            ]);
            assert_eq!(
                package_name(Cursor::new(apk)),
                Ok("com.example.game".into())
            );
        }
    }

    #[test]
    fn versions_by_name_by_resource_id_and_from_the_code() {
        let none = u32::MAX;
        // versionName by name.
        let doc = axml_doc(
            &["manifest", "package", "com.a.b", "versionName", "2.5.1"],
            &[(1, 2, TYPE_STRING, 2), (3, 4, TYPE_STRING, 4)],
            &[],
            false,
        );
        let m = manifest(&doc).expect("manifest");
        assert_eq!(
            (m.package.as_str(), m.version.as_deref()),
            ("com.a.b", Some("2.5.1"))
        );
        // Names stripped: the resource map says which attribute is which;
        // versionCode only when there is no name.
        let doc = axml_doc(
            &["", "", "manifest", "package", "com.a.b"],
            &[(3, 4, TYPE_STRING, 4), (0, none, TYPE_INT_DEC, 42)],
            &[ATTR_VERSION_CODE, ATTR_VERSION_NAME],
            true,
        );
        assert_eq!(
            manifest(&doc).expect("manifest").version.as_deref(),
            Some("42")
        );
        let doc = axml_doc(
            &["", "", "manifest", "package", "com.a.b", "3.0"],
            &[
                (3, 4, TYPE_STRING, 4),
                (0, none, TYPE_INT_DEC, 42),
                (1, 5, TYPE_STRING, 5),
            ],
            &[ATTR_VERSION_CODE, ATTR_VERSION_NAME],
            true,
        );
        assert_eq!(
            manifest(&doc).expect("manifest").version.as_deref(),
            Some("3.0")
        );
        assert_eq!(
            manifest(&axml("com.a.b", true)).expect("manifest").version,
            None
        );
        let text =
            b"<manifest xmlns:android=\"x\" package=\"org.t.a\" android:versionName=\"1.0\">";
        assert_eq!(
            manifest(text).expect("manifest").version.as_deref(),
            Some("1.0")
        );
    }

    #[test]
    fn text_manifest() {
        let apk = zip_with(&[(
            "AndroidManifest.xml",
            b"<?xml version=\"1.0\"?>\n<manifest xmlns:android=\"x\" package=\"org.test.app\"></manifest>",
        )]);
        assert_eq!(package_name(Cursor::new(apk)), Ok("org.test.app".into()));
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            package_name(Cursor::new(b"PK not really".to_vec())),
            Err(ApkError::NotZip(_))
        ));
        let no_manifest = zip_with(&[("classes.dex", b"x")]);
        assert_eq!(
            package_name(Cursor::new(no_manifest)),
            Err(ApkError::NoManifest)
        );
        let no_package = zip_with(&[("AndroidManifest.xml", b"<manifest></manifest>")]);
        assert_eq!(
            package_name(Cursor::new(no_package)),
            Err(ApkError::NoPackage)
        );
        let bad = zip_with(&[("AndroidManifest.xml", &axml("../etc", true))]);
        assert_eq!(
            package_name(Cursor::new(bad)),
            Err(ApkError::BadPackage("../etc".into()))
        );
        let mut truncated = axml("com.a.b", false);
        truncated.truncate(40);
        assert!(matches!(
            manifest_package(&truncated),
            Err(ApkError::BadManifest(_))
        ));
    }

    #[test]
    fn package_names() {
        assert!(valid_package("com.example.app_2"));
        assert!(!valid_package("single"));
        assert!(!valid_package("com..x"));
        assert!(!valid_package("com.1abc"));
        assert!(!valid_package("com.a b"));
    }
}
