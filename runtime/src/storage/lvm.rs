//! LVM thin provisioning, planned as pure code: a thin pool in a volume
//! group, one thin volume per image (made read-only once filled) and one
//! thin snapshot per phone, whose virtual size is the phone's disk size.
//! Every step is an [`Invocation`] so the plan is checked on its argv; the
//! same runner as the other backends executes it where dm-thin works.

use super::cmd::Invocation;

/// Names of one host's thin pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPool {
    pub vg: String,
    pub pool: String,
}

impl ThinPool {
    /// Physical volume, volume group and the thin pool of `size_bytes`.
    pub fn create(&self, pv: &str, size_bytes: u64) -> Vec<Invocation> {
        vec![
            Invocation::new("pvcreate", &["-y", pv]),
            Invocation::new("vgcreate", &[self.vg.as_str(), pv]),
            Invocation::new(
                "lvcreate",
                &[
                    "--yes",
                    "--type",
                    "thin-pool",
                    "--size",
                    &format!("{size_bytes}b"),
                    "--name",
                    &self.pool,
                    &self.vg,
                ],
            ),
        ]
    }

    /// The image's thin volume and its filesystem.
    pub fn create_image(&self, image_id: &str, virtual_bytes: u64) -> Vec<Invocation> {
        let lv = image_lv(image_id);
        vec![
            Invocation::new(
                "lvcreate",
                &[
                    "--yes",
                    "--thin",
                    "--virtualsize",
                    &format!("{virtual_bytes}b"),
                    "--name",
                    &lv,
                    &format!("{}/{}", self.vg, self.pool),
                ],
            ),
            Invocation::new("mkfs.ext4", &["-q", &self.device(&lv)]),
        ]
    }

    /// Marks a filled image volume read-only.
    pub fn seal_image(&self, image_id: &str) -> Invocation {
        Invocation::new(
            "lvchange",
            &[
                "--permission",
                "r",
                &format!("{}/{}", self.vg, image_lv(image_id)),
            ],
        )
    }

    /// A phone's thin snapshot of an image, activated (thin snapshots skip
    /// activation by default), then grown to the phone's disk size.
    pub fn snapshot(&self, image_id: &str, phone_id: &str, disk_bytes: u64) -> Vec<Invocation> {
        let lv = phone_lv(phone_id);
        let full = format!("{}/{}", self.vg, lv);
        vec![
            Invocation::new(
                "lvcreate",
                &[
                    "--yes",
                    "--snapshot",
                    "--setactivationskip",
                    "n",
                    "--name",
                    &lv,
                    &format!("{}/{}", self.vg, image_lv(image_id)),
                ],
            ),
            Invocation::new("lvchange", &["--permission", "rw", &full]),
            Invocation::new("lvchange", &["--activate", "y", &full]),
            Invocation::new(
                "lvextend",
                &["--size", &format!("{disk_bytes}b"), "--resizefs", &full],
            ),
        ]
    }

    /// Removes a phone's snapshot (its blocks return to the pool).
    pub fn remove_phone(&self, phone_id: &str) -> Invocation {
        Invocation::new(
            "lvremove",
            &["--yes", &format!("{}/{}", self.vg, phone_lv(phone_id))],
        )
    }

    /// Drops the phone's snapshot and takes a new one: a reset.
    pub fn reset(&self, image_id: &str, phone_id: &str, disk_bytes: u64) -> Vec<Invocation> {
        let mut v = vec![self.remove_phone(phone_id)];
        v.extend(self.snapshot(image_id, phone_id, disk_bytes));
        v
    }

    /// Removes the volume group and everything in it.
    pub fn destroy(&self, pv: &str) -> Vec<Invocation> {
        vec![
            Invocation::new("vgremove", &["--yes", "--force", &self.vg]),
            Invocation::new("pvremove", &["-y", pv]),
        ]
    }

    pub fn device(&self, lv: &str) -> String {
        format!("/dev/{}/{}", self.vg, lv)
    }
}

/// Logical volume name of an image.
pub fn image_lv(image_id: &str) -> String {
    format!("img-{image_id}")
}

/// Logical volume name of a phone.
pub fn phone_lv(phone_id: &str) -> String {
    format!("phone-{phone_id}")
}

/// Why dm-thin cannot be used here, or `None` when `/dev/mapper/control`
/// answers.
pub fn unavailable_reason() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/mapper/control cannot be opened: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(v: &[Invocation]) -> Vec<String> {
        v.iter().map(Invocation::display).collect()
    }

    #[test]
    fn pool_image_snapshot_and_reset_render() {
        let p = ThinPool {
            vg: "cph".into(),
            pool: "thinpool".into(),
        };
        assert_eq!(
            texts(&p.create("/dev/sdb", 1 << 30)),
            [
                "pvcreate -y /dev/sdb",
                "vgcreate cph /dev/sdb",
                "lvcreate --yes --type thin-pool --size 1073741824b --name thinpool cph",
            ]
        );
        assert_eq!(
            texts(&p.create_image("a1", 4096)),
            [
                "lvcreate --yes --thin --virtualsize 4096b --name img-a1 cph/thinpool",
                "mkfs.ext4 -q /dev/cph/img-a1",
            ]
        );
        assert_eq!(
            p.seal_image("a1").display(),
            "lvchange --permission r cph/img-a1"
        );
        let snap = texts(&p.snapshot("a1", "p9", 8192));
        assert_eq!(
            snap[0],
            "lvcreate --yes --snapshot --setactivationskip n --name phone-p9 cph/img-a1"
        );
        assert_eq!(snap[3], "lvextend --size 8192b --resizefs cph/phone-p9");
        let reset = texts(&p.reset("b2", "p9", 8192));
        assert_eq!(reset[0], "lvremove --yes cph/phone-p9");
        assert!(reset[1].ends_with("cph/img-b2"));
        assert_eq!(
            texts(&p.destroy("/dev/sdb")),
            ["vgremove --yes --force cph", "pvremove -y /dev/sdb"]
        );
    }
}
