//! Phone attributes: the names of the reference's list (A.1) and what each
//! value may be. The control plane checks a request with these rules before
//! it accepts it; the agent checks again before a phone records anything.
//!
//! Where the reference contradicts itself the rule follows what a phone
//! needs: `gsm.*.numeric` is documented as letters and commas with a
//! default of `46000`, so digits pass too; the game URLs list neither `:`
//! nor `.` among their characters, which no `http://host.domain` can do
//! without, so both pass; the request examples spell three names without
//! their underscore (`sys.prop.writeimsi`), so those spellings pass too.
//! Deprecated names are still taken (old scripts keep working) with any
//! printable value up to 256 bytes.
//!
//! Names beginning with `ro.` are read-only in Android once set, so a
//! phone gets them at its next start, as init arguments; the others are
//! set at once in a running phone. Android forgets those at every start,
//! except `persist.*` ones, which it keeps in the phone's data.

use std::collections::BTreeMap;

/// Why a property was refused: the reference's code and a message saying
/// what the value must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// `CPS.0163` (name not in the list), or the code of an invalid value
    /// (see [`invalid_code`]).
    pub code: &'static str,
    pub message: String,
}

/// The reference's code for an invalid value of `name`: the attributes its
/// error list names have their own (phone_num, imsi, wifi_name,
/// hide_navigate for the virtual keys, gsm_* for the network carrier,
/// sim_* for the SIM card), every other one `CPS.0164`.
pub fn invalid_code(name: &str) -> &'static str {
    match canonical(name) {
        "sys.prop.write_phonenum" => "CPS.0074",
        "sys.prop.write_imsi" => "CPS.0075",
        "sys.prop.write_wifissid" => "CPS.0082",
        "com.cph.mainkeys" | "qemu.hw.mainkeys" => "CPS.0127",
        "gsm.operator.iso-country" => "CPS.0128",
        "gsm.operator.numeric" => "CPS.0129",
        "gsm.operator.alpha" => "CPS.0130",
        "gsm.sim.operator.iso-country" => "CPS.0131",
        "gsm.sim.operator.numeric" => "CPS.0132",
        "gsm.sim.operator.alpha" => "CPS.0133",
        _ => "CPS.0164",
    }
}

/// What a value of an attribute must look like.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// `0` or `1`.
    Flag,
    /// `min..=max` decimal digits.
    Digits { min: usize, max: usize },
    /// A decimal number in `min..=max`.
    Range { min: u32, max: u32 },
    /// `1..=99999999` kbit/s, or `-1` for no limit.
    Bandwidth,
    /// `min..=max` characters, each alphanumeric or one of `extra`.
    Text {
        min: usize,
        max: usize,
        extra: &'static str,
    },
    /// `0..=max` characters, each a letter or a comma.
    Letters { max: usize },
    /// `http://` or `https://`, at most 256 characters.
    Url,
    /// Deprecated: printable, at most 256 bytes.
    Any,
}

use Rule::*;

const ALPHA_EXTRA: &str = "-_@#.,:/\\() ";

/// The reference's attribute list (A.1).
const ATTRIBUTES: &[(&str, Rule)] = &[
    ("com.cph.mainkeys", Flag),
    ("disable.status.bar", Flag),
    ("ro.permission.changed", Flag),
    ("ro.install.auto", Flag),
    ("ro.com.cph.non_root", Flag),
    ("ro.com.cph.notification_disable", Flag),
    ("com.cph.disable_fb_permission", Flag),
    ("com.cph.bandwidth_limit", Bandwidth),
    ("ro.com.cph.toast_enable", Flag),
    (
        "com.cph.cam_local_pic_path",
        Text {
            min: 1,
            max: 90,
            extra: "-_@#.:/ ",
        },
    ),
    (
        "persist.sys.locale",
        Text {
            min: 1,
            max: 64,
            extra: "-",
        },
    ),
    ("sys.prop.write_imsi", Digits { min: 0, max: 15 }),
    ("sys.prop.write_phonenum", Digits { min: 0, max: 20 }),
    (
        "sys.prop.write_wifissid",
        Text {
            min: 1,
            max: 64,
            extra: "-_./",
        },
    ),
    ("gsm.sim.operator.iso-country", Letters { max: 10 }),
    (
        "gsm.sim.operator.numeric",
        Text {
            min: 0,
            max: 10,
            extra: ",",
        },
    ),
    (
        "gsm.sim.operator.alpha",
        Text {
            min: 0,
            max: 90,
            extra: ALPHA_EXTRA,
        },
    ),
    ("gsm.operator.iso-country", Letters { max: 10 }),
    (
        "gsm.operator.numeric",
        Text {
            min: 0,
            max: 10,
            extra: ",",
        },
    ),
    (
        "gsm.operator.alpha",
        Text {
            min: 0,
            max: 90,
            extra: ALPHA_EXTRA,
        },
    ),
    ("ro.hardware.gpu-renderer", Any),
    ("ro.board.platform", Any),
    ("ro.build.product", Any),
    ("ro.product.device", Any),
    ("ro.com.cph.sfs_enable", Any),
    ("ro.product.manufacturer", Any),
    ("ro.product.name", Any),
    ("qemu.hw.mainkeys", Flag),
    ("ro.horizontal.screen", Flag),
    ("com.cph.cg.sign_check_url", Url),
    ("com.cph.cg.event_notify_url", Url),
    ("com.cph.cg.heartbeat_url", Url),
    ("com.cph.cg.heartbeat_interval", Digits { min: 1, max: 10 }),
    (
        "com.cph.cg.app_port",
        Range {
            min: 10_000,
            max: 11_000,
        },
    ),
    (
        "com.cph.cg.h5_port",
        Range {
            min: 10_000,
            max: 11_000,
        },
    ),
    ("ro.com.cph.cloud_app_engine", Flag),
];

/// Characters allowed in a game URL besides letters and digits.
const URL_EXTRA: &str = "_,/;-:.";

fn digits(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_digit())
}

impl Rule {
    /// `None` when `v` is valid, else what a value must be.
    fn fault(self, v: &str) -> Option<String> {
        let chars = v.chars().count();
        match self {
            Flag => (v != "0" && v != "1").then(|| "0 or 1".to_string()),
            Digits { min, max } => (!digits(v) || !(min..=max).contains(&chars))
                .then(|| format!("{min} to {max} decimal digits")),
            Range { min, max } => (!digits(v)
                || v.is_empty()
                || !v.parse::<u32>().is_ok_and(|n| (min..=max).contains(&n)))
            .then(|| format!("a number from {min} to {max}")),
            Bandwidth => (v != "-1"
                && !(digits(v)
                    && !v.is_empty()
                    && v.parse::<u32>()
                        .is_ok_and(|n| (1..=99_999_999).contains(&n))))
            .then(|| "a rate from 1 to 99999999 kbit/s, or -1 for no limit".to_string()),
            Text { min, max, extra } => (!(min..=max).contains(&chars)
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(c)))
            .then(|| format!("{min} to {max} characters: letters, digits and {extra:?}")),
            Letters { max } => (chars > max
                || !v.chars().all(|c| c.is_ascii_alphabetic() || c == ','))
            .then(|| format!("at most {max} characters: letters and commas")),
            Url => {
                let scheme = v.starts_with("http://") || v.starts_with("https://");
                (!scheme
                    || chars > 256
                    || !v.chars().all(|c| c.is_ascii_alphanumeric() || URL_EXTRA.contains(c)))
                .then(|| {
                    format!(
                        "http:// or https:// then letters, digits and {URL_EXTRA:?}, 256 characters at most"
                    )
                })
            }
            Any => (v.len() > 256 || v.chars().any(char::is_control))
                .then(|| "printable, 256 bytes at most".to_string()),
        }
    }
}

/// Checks one attribute.
pub fn check(name: &str, value: &str) -> Result<(), Refused> {
    let rule = rule(name)?;
    match rule.fault(value) {
        None => Ok(()),
        Some(want) => Err(Refused {
            code: invalid_code(name),
            message: format!("invalid property {name}={value:?}: it must be {want}"),
        }),
    }
}

/// The refusal of `name` given something other than a string, number or
/// boolean (an object, an array, null): an unknown name as such, else an
/// invalid value of the attribute.
pub fn not_a_value(name: &str) -> Refused {
    match rule(name) {
        Err(unknown) => unknown,
        Ok(_) => Refused {
            code: invalid_code(name),
            message: format!("invalid property {name}: its value must be a string or a number"),
        },
    }
}

/// The spellings of the reference's request examples, taken as the list's
/// names they stand for (under their own name: the phone's image reads one
/// or the other).
const EXAMPLE_SPELLINGS: &[(&str, &str)] = &[
    ("sys.prop.writeimsi", "sys.prop.write_imsi"),
    ("sys.prop.writephonenum", "sys.prop.write_phonenum"),
    ("sys.prop.writewifissid", "sys.prop.write_wifissid"),
];

/// The list's name `name` stands for.
fn canonical(name: &str) -> &str {
    EXAMPLE_SPELLINGS
        .iter()
        .find(|(spelt, _)| *spelt == name)
        .map_or(name, |(_, listed)| listed)
}

/// The rule of `name`, or its refusal as not supported (CPS.0163).
fn rule(name: &str) -> Result<Rule, Refused> {
    let listed = canonical(name);
    ATTRIBUTES
        .iter()
        .find(|(n, _)| *n == listed)
        .map(|(_, rule)| *rule)
        .ok_or_else(|| Refused {
            code: "CPS.0163",
            message: format!("property {name} not supported"),
        })
}

/// Checks every attribute of `property`; the first refusal in name order.
pub fn check_all(property: &BTreeMap<String, String>) -> Result<(), Refused> {
    property.iter().try_for_each(|(k, v)| check(k, v))
}

/// Whether `name` is read-only once set (`ro.*`): such a property reaches
/// a phone at its next start, as an init argument.
pub fn read_only(name: &str) -> bool {
    name.starts_with("ro.")
}

/// Whether Android keeps `name` across starts itself (`persist.*`, in its
/// data): such a property is set once (at the phone's first start, or when
/// it is given), so a value the user then picks inside the phone (its
/// language) is not set back at every start.
pub fn persistent(name: &str) -> bool {
    name.starts_with("persist.")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(name: &str, value: &str) -> Option<&'static str> {
        check(name, value).err().map(|r| r.code)
    }

    #[test]
    fn names_outside_the_list_are_not_supported() {
        assert_eq!(code("no.such.property", "1"), Some("CPS.0163"));
        // The reference's request examples spell some names without the
        // underscore: taken too, with the same rules.
        assert_eq!(check("sys.prop.writeimsi", "460021624617113"), Ok(()));
        assert_eq!(check("sys.prop.writephonenum", "13666666666"), Ok(()));
        assert_eq!(check("sys.prop.writewifissid", "test_wifi"), Ok(()));
        assert_eq!(code("sys.prop.writeimsi", "46002x"), Some("CPS.0075"));
    }

    #[test]
    fn values_follow_the_reference_constraints() {
        let ok = [
            ("com.cph.mainkeys", "1"),
            ("com.cph.bandwidth_limit", "-1"),
            ("com.cph.bandwidth_limit", "99999999"),
            ("com.cph.cam_local_pic_path", "/sdcard/DCIM/a b@#.jpg"),
            ("persist.sys.locale", "zh-Hans-CN"),
            ("sys.prop.write_imsi", "460001234567890"),
            ("sys.prop.write_phonenum", "13800000000"),
            ("sys.prop.write_wifissid", "cloudphone_wifi"),
            ("gsm.sim.operator.iso-country", "cn"),
            ("gsm.sim.operator.numeric", "46000"),
            ("gsm.operator.alpha", "China Mobile (CMCC)"),
            ("ro.product.name", "monbox"),
            ("ro.horizontal.screen", "0"),
            (
                "com.cph.cg.heartbeat_url",
                "https://game.example.com:8443/hb;v-1",
            ),
            ("com.cph.cg.heartbeat_interval", "30"),
            ("com.cph.cg.app_port", "10000"),
            ("com.cph.cg.h5_port", "11000"),
        ];
        for (k, v) in ok {
            assert_eq!(check(k, v), Ok(()), "{k}={v}");
        }
        let bad = [
            ("com.cph.mainkeys", "7"),
            ("disable.status.bar", "true"),
            ("com.cph.bandwidth_limit", "0"),
            ("com.cph.bandwidth_limit", "+5"),
            ("com.cph.bandwidth_limit", "100000000"),
            ("com.cph.cam_local_pic_path", ""),
            ("com.cph.cam_local_pic_path", "/sdcard/a;b"),
            ("persist.sys.locale", ""),
            ("persist.sys.locale", "en_US"),
            ("sys.prop.write_imsi", "4600012345678901"),
            ("sys.prop.write_imsi", "46000abc"),
            ("sys.prop.write_phonenum", "+8613800000000"),
            ("sys.prop.write_wifissid", ""),
            ("sys.prop.write_wifissid", "my wifi"),
            ("gsm.operator.iso-country", "cn-1"),
            ("gsm.operator.iso-country", "c1"),
            ("gsm.sim.operator.iso-country", "460"),
            ("gsm.sim.operator.numeric", "46000460004"),
            ("gsm.operator.alpha", "a\"b"),
            ("ro.product.name", "a\nb"),
            ("ro.horizontal.screen", "2"),
            ("ro.com.cph.cloud_app_engine", "yes"),
            ("com.cph.cg.sign_check_url", "ftp://example.com"),
            ("com.cph.cg.sign_check_url", "https://example.com/?a=b"),
            ("com.cph.cg.heartbeat_interval", ""),
            ("com.cph.cg.heartbeat_interval", "12345678901"),
            ("com.cph.cg.app_port", "9999"),
            ("com.cph.cg.h5_port", "11001"),
        ];
        for (k, v) in bad {
            assert_eq!(code(k, v), Some(invalid_code(k)), "{k}={v}");
        }
    }

    /// The attributes the reference's error list names get their own code;
    /// the others CPS.0164.
    #[test]
    fn invalid_values_carry_the_attribute_s_code() {
        let cases = [
            ("sys.prop.write_phonenum", "+86", "CPS.0074"),
            ("sys.prop.write_imsi", "46000x", "CPS.0075"),
            ("sys.prop.write_wifissid", "my wifi", "CPS.0082"),
            ("com.cph.mainkeys", "2", "CPS.0127"),
            ("qemu.hw.mainkeys", "2", "CPS.0127"),
            ("gsm.operator.iso-country", "c1", "CPS.0128"),
            ("gsm.operator.numeric", "4600046000460", "CPS.0129"),
            ("gsm.operator.alpha", "a\"b", "CPS.0130"),
            ("gsm.sim.operator.iso-country", "460", "CPS.0131"),
            ("gsm.sim.operator.numeric", "4600046000460", "CPS.0132"),
            ("gsm.sim.operator.alpha", "a;b", "CPS.0133"),
            ("disable.status.bar", "2", "CPS.0164"),
            ("com.cph.cg.app_port", "9999", "CPS.0164"),
        ];
        for (k, v, want) in cases {
            assert_eq!(code(k, v), Some(want), "{k}={v}");
        }
        assert_eq!(not_a_value("no.such").code, "CPS.0163");
        assert_eq!(not_a_value("sys.prop.write_imsi").code, "CPS.0075");
        assert_eq!(not_a_value("disable.status.bar").code, "CPS.0164");
    }

    #[test]
    fn a_refusal_says_what_the_value_must_be() {
        let r = check("sys.prop.write_imsi", "abc").expect_err("refused");
        assert!(r.message.contains("sys.prop.write_imsi"), "{}", r.message);
        assert!(
            r.message.contains("0 to 15 decimal digits"),
            "{}",
            r.message
        );
    }

    #[test]
    fn a_map_is_refused_at_its_first_bad_attribute() {
        let mut p = BTreeMap::new();
        p.insert("com.cph.mainkeys".to_string(), "1".to_string());
        assert_eq!(check_all(&p), Ok(()));
        p.insert("ro.install.auto".to_string(), "2".to_string());
        assert_eq!(check_all(&p).map_err(|r| r.code), Err("CPS.0164"));
    }
}
