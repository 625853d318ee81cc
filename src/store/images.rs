//! Custom images: a phone's root written to the object store as a tar,
//! owned by one project and shared with at most [`MAX_MEMBERS`] others.
//! A member sees a shared image once it has accepted it.

use rusqlite::{params, OptionalExtension, Row};

use super::{Result, Store};

/// Most projects one image is shared with (the reference's limit).
pub const MAX_MEMBERS: usize = 10;

/// Image states as the API shows them.
pub const IMAGE_CREATING: i32 = 0;
pub const IMAGE_ACTIVE: i32 = 1;
pub const IMAGE_FAILED: i32 = 2;

/// A custom image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub image_id: String,
    pub project_id: String,
    pub image_name: String,
    /// The image of the phone it was made from.
    pub base_image_id: String,
    pub image_label: String,
    pub os_type: String,
    pub os_name: String,
    /// `obs://bucket/key` of its rootfs tar.
    pub url: String,
    pub status: i32,
    pub image_size: u64,
    pub create_ms: i64,
    pub update_ms: i64,
}

/// A project an image is shared with: `pending`, `accepted` or `rejected`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageMember {
    pub image_id: String,
    pub member_id: String,
    pub status: String,
    pub create_ms: i64,
    pub update_ms: i64,
}

/// Which images a listing shows.
#[derive(Debug, Clone, Default)]
pub struct ImageFilter {
    /// `Some(true)`: only the project's own; `Some(false)`: only those
    /// shared with it; `None`: both.
    pub own: Option<bool>,
    pub status: Option<i32>,
    pub image_id: Option<String>,
    pub image_name: Option<String>,
    pub create_since: Option<i64>,
    pub create_until: Option<i64>,
    pub src_project_id: Option<String>,
}

/// What adding a member did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberWrite {
    Added,
    /// Already a member: left as it was.
    Exists,
    /// The image is shared with [`MAX_MEMBERS`] projects already.
    TooMany,
}

const COLS: &str = "image_id, project_id, image_name, base_image_id, image_label, os_type, \
                    os_name, url, status, image_size, create_ms, update_ms";

fn image_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        image_id: r.get(0)?,
        project_id: r.get(1)?,
        image_name: r.get(2)?,
        base_image_id: r.get(3)?,
        image_label: r.get(4)?,
        os_type: r.get(5)?,
        os_name: r.get(6)?,
        url: r.get(7)?,
        status: r.get(8)?,
        image_size: r.get::<_, i64>(9)?.max(0) as u64,
        create_ms: r.get(10)?,
        update_ms: r.get(11)?,
    })
}

fn member_row(r: &Row<'_>) -> rusqlite::Result<ImageMember> {
    Ok(ImageMember {
        image_id: r.get(0)?,
        member_id: r.get(1)?,
        status: r.get(2)?,
        create_ms: r.get(3)?,
        update_ms: r.get(4)?,
    })
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Store {
    pub fn insert_image(&self, i: &Image) -> Result<()> {
        self.db()?.execute(
            &format!("INSERT INTO images ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
            params![
                i.image_id,
                i.project_id,
                i.image_name,
                i.base_image_id,
                i.image_label,
                i.os_type,
                i.os_name,
                i.url,
                i.status,
                i.image_size as i64,
                i.create_ms,
                i.update_ms
            ],
        )?;
        Ok(())
    }

    /// An image by id, whoever owns it.
    pub fn image_by_id(&self, image_id: &str) -> Result<Option<Image>> {
        Ok(self
            .db()?
            .query_row(
                &format!("SELECT {COLS} FROM images WHERE image_id = ?1"),
                [image_id],
                image_row,
            )
            .optional()?)
    }

    /// An image a project may start phones from: its own or one shared
    /// with it and accepted, in any state.
    pub fn visible_image(&self, project_id: &str, image_id: &str) -> Result<Option<Image>> {
        Ok(self
            .db()?
            .query_row(
                &format!(
                    "SELECT {COLS} FROM images i WHERE image_id = ?2 AND (project_id = ?1
                     OR EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = i.image_id
                                AND m.member_id = ?1 AND m.status = 'accepted'))"
                ),
                params![project_id, image_id],
                image_row,
            )
            .optional()?)
    }

    /// Every active image a project may run phones from (its own and the
    /// accepted shares), by name.
    pub fn usable_images(&self, project_id: &str) -> Result<Vec<Image>> {
        let c = self.db()?;
        let mut st = c.prepare(&format!(
            "SELECT {COLS} FROM images i WHERE status = ?2 AND (project_id = ?1
             OR EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = i.image_id
                        AND m.member_id = ?1 AND m.status = 'accepted'))
             ORDER BY image_name, image_id"
        ))?;
        let rows = st.query_map(params![project_id, IMAGE_ACTIVE], image_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A project's own images and those shared with it (any member state,
    /// so it can accept them), newest first, with the total before paging.
    pub fn list_images(
        &self,
        project_id: &str,
        f: &ImageFilter,
        offset: u32,
        limit: u32,
    ) -> Result<(Vec<Image>, u64)> {
        let mut cond = String::from(
            "(project_id = ?1
             OR EXISTS (SELECT 1 FROM image_members m WHERE m.image_id = i.image_id
                        AND m.member_id = ?1))",
        );
        let mut args: Vec<rusqlite::types::Value> = vec![project_id.to_string().into()];
        let mut arg = |cond: &mut String, more: &str, v: rusqlite::types::Value| {
            args.push(v);
            cond.push_str(&more.replace('?', &format!("?{}", args.len())));
        };
        match f.own {
            Some(true) => arg(
                &mut cond,
                " AND project_id = ?",
                project_id.to_string().into(),
            ),
            Some(false) => arg(
                &mut cond,
                " AND project_id <> ?",
                project_id.to_string().into(),
            ),
            None => {}
        }
        if let Some(s) = f.status {
            arg(&mut cond, " AND status = ?", i64::from(s).into());
        }
        if let Some(id) = &f.image_id {
            arg(&mut cond, " AND image_id = ?", id.clone().into());
        }
        if let Some(n) = &f.image_name {
            arg(&mut cond, " AND image_name = ?", n.clone().into());
        }
        if let Some(t) = f.create_since {
            arg(&mut cond, " AND create_ms >= ?", t.into());
        }
        if let Some(t) = f.create_until {
            arg(&mut cond, " AND create_ms <= ?", t.into());
        }
        if let Some(p) = &f.src_project_id {
            arg(&mut cond, " AND project_id = ?", p.clone().into());
        }
        let c = self.db()?;
        let total: i64 = c.query_row(
            &format!("SELECT COUNT(*) FROM images i WHERE {cond}"),
            rusqlite::params_from_iter(args.iter()),
            |r| r.get(0),
        )?;
        let n = args.len();
        args.push(i64::from(limit).into());
        args.push(i64::from(offset).into());
        let mut st = c.prepare(&format!(
            "SELECT {COLS} FROM images i WHERE {cond}
             ORDER BY create_ms DESC, image_id LIMIT ?{} OFFSET ?{}",
            n + 1,
            n + 2
        ))?;
        let page = st
            .query_map(rusqlite::params_from_iter(args.iter()), image_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let total = total.max(0) as u64;
        Ok((page, total))
    }

    /// Ends an image's creation: active with its size, or failed. An image
    /// deleted meanwhile stays deleted.
    pub fn finish_image(&self, image_id: &str, size: Option<u64>) -> Result<()> {
        let (status, size) = match size {
            Some(n) => (IMAGE_ACTIVE, n as i64),
            None => (IMAGE_FAILED, 0),
        };
        self.db()?.execute(
            "UPDATE images SET status = ?2, image_size = ?3, update_ms = ?4
             WHERE image_id = ?1 AND status = ?5",
            params![image_id, status, size, now_ms(), IMAGE_CREATING],
        )?;
        Ok(())
    }

    /// Removes an image and its members; whether it was there.
    pub fn delete_image(&self, image_id: &str) -> Result<bool> {
        Ok(self
            .db()?
            .execute("DELETE FROM images WHERE image_id = ?1", [image_id])?
            > 0)
    }

    /// Shares an image with a project (pending until it accepts).
    pub fn add_image_member(&self, image_id: &str, member_id: &str) -> Result<MemberWrite> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM image_members WHERE image_id = ?1 AND member_id = ?2)",
            params![image_id, member_id],
            |r| r.get(0),
        )?;
        if exists {
            return Ok(MemberWrite::Exists);
        }
        let held: i64 = tx.query_row(
            "SELECT COUNT(*) FROM image_members WHERE image_id = ?1",
            [image_id],
            |r| r.get(0),
        )?;
        if held as usize >= MAX_MEMBERS {
            return Ok(MemberWrite::TooMany);
        }
        let now = now_ms();
        tx.execute(
            "INSERT INTO image_members (image_id, member_id, status, create_ms, update_ms)
             VALUES (?1, ?2, 'pending', ?3, ?3)",
            params![image_id, member_id, now],
        )?;
        tx.commit()?;
        Ok(MemberWrite::Added)
    }

    /// An image's members in member id order, after `marker` when given.
    pub fn image_members(
        &self,
        image_id: &str,
        marker: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ImageMember>> {
        let c = self.db()?;
        let mut st = c.prepare(
            "SELECT image_id, member_id, status, create_ms, update_ms FROM image_members
             WHERE image_id = ?1 AND member_id > ?2 ORDER BY member_id LIMIT ?3",
        )?;
        let rows = st.query_map(params![image_id, marker.unwrap_or(""), limit], member_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// One membership, if the image is shared with `member_id`.
    pub fn image_member(&self, image_id: &str, member_id: &str) -> Result<Option<ImageMember>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT image_id, member_id, status, create_ms, update_ms FROM image_members
                 WHERE image_id = ?1 AND member_id = ?2",
                params![image_id, member_id],
                member_row,
            )
            .optional()?)
    }

    /// A member accepts or rejects an image; whether it was a member.
    pub fn set_image_member_status(
        &self,
        image_id: &str,
        member_id: &str,
        status: &str,
    ) -> Result<bool> {
        Ok(self.db()?.execute(
            "UPDATE image_members SET status = ?3, update_ms = ?4
             WHERE image_id = ?1 AND member_id = ?2",
            params![image_id, member_id, status, now_ms()],
        )? > 0)
    }

    /// Stops sharing an image with a project; whether it was shared.
    pub fn delete_image_member(&self, image_id: &str, member_id: &str) -> Result<bool> {
        Ok(self.db()?.execute(
            "DELETE FROM image_members WHERE image_id = ?1 AND member_id = ?2",
            params![image_id, member_id],
        )? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, project: &str, ms: i64) -> Image {
        Image {
            image_id: id.into(),
            project_id: project.into(),
            image_name: format!("name-{id}"),
            base_image_id: "base".into(),
            image_label: "cloud_phone".into(),
            os_type: "android".into(),
            os_name: "Android 11".into(),
            url: format!("obs://b/{id}.tar"),
            status: IMAGE_CREATING,
            image_size: 0,
            create_ms: ms,
            update_ms: ms,
        }
    }

    #[test]
    fn shared_images_are_visible_once_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_dir(dir.path()).unwrap();
        s.insert_image(&image("i1", "p1", 1)).unwrap();
        s.insert_image(&image("i2", "p2", 2)).unwrap();
        assert!(s.visible_image("p1", "i1").unwrap().is_some());
        assert!(s.visible_image("p2", "i1").unwrap().is_none());

        assert_eq!(s.add_image_member("i1", "p2").unwrap(), MemberWrite::Added);
        assert_eq!(s.add_image_member("i1", "p2").unwrap(), MemberWrite::Exists);
        // Pending: listed for the member, not usable yet.
        let (shared, total) = s
            .list_images(
                "p2",
                &ImageFilter {
                    own: Some(false),
                    ..Default::default()
                },
                0,
                100,
            )
            .unwrap();
        assert_eq!((shared.len(), total), (1, 1));
        assert_eq!(shared[0].image_id, "i1");
        assert!(s.visible_image("p2", "i1").unwrap().is_none());
        assert!(s.set_image_member_status("i1", "p2", "accepted").unwrap());
        assert!(s.visible_image("p2", "i1").unwrap().is_some());
        // Usable once active.
        assert!(s.usable_images("p2").unwrap().is_empty());
        s.finish_image("i1", Some(1)).unwrap();
        let usable = s.usable_images("p2").unwrap();
        assert_eq!(usable.len(), 1);
        assert_eq!(usable[0].image_id, "i1");
        assert!(s.set_image_member_status("i1", "p2", "rejected").unwrap());
        assert!(s.usable_images("p2").unwrap().is_empty());
        assert!(s.visible_image("p2", "i1").unwrap().is_none());

        // Both of p2's, newest first; paging keeps the total.
        let (all, total) = s.list_images("p2", &ImageFilter::default(), 0, 1).unwrap();
        assert_eq!(total, 2);
        assert_eq!(all[0].image_id, "i2");
        let (next, _) = s.list_images("p2", &ImageFilter::default(), 1, 1).unwrap();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].image_id, "i1");
        let (past, total) = s.list_images("p2", &ImageFilter::default(), 5, 1).unwrap();
        assert_eq!((past.len(), total), (0, 2));

        assert!(s.delete_image_member("i1", "p2").unwrap());
        assert!(!s.delete_image_member("i1", "p2").unwrap());
        let (all, _) = s.list_images("p2", &ImageFilter::default(), 0, 10).unwrap();
        assert_eq!(all.len(), 1);
    }

    #[test]
    fn members_are_capped_and_go_with_their_image() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_dir(dir.path()).unwrap();
        s.insert_image(&image("i1", "p1", 1)).unwrap();
        for n in 0..MAX_MEMBERS {
            assert_eq!(
                s.add_image_member("i1", &format!("m{n:02}")).unwrap(),
                MemberWrite::Added
            );
        }
        assert_eq!(
            s.add_image_member("i1", "late").unwrap(),
            MemberWrite::TooMany
        );
        let first = s.image_members("i1", None, 4).unwrap();
        assert_eq!(first.len(), 4);
        let next = s
            .image_members("i1", Some(&first[3].member_id), 100)
            .unwrap();
        assert_eq!(next.len(), MAX_MEMBERS - 4);
        assert!(s.delete_image("i1").unwrap());
        assert!(s.image_member("i1", "m00").unwrap().is_none());
    }

    #[test]
    fn creation_ends_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_dir(dir.path()).unwrap();
        s.insert_image(&image("i1", "p1", 1)).unwrap();
        s.finish_image("i1", Some(4096)).unwrap();
        // A late failure report does not undo a finished image.
        s.finish_image("i1", None).unwrap();
        let i = s.image_by_id("i1").unwrap().unwrap();
        assert_eq!((i.status, i.image_size), (IMAGE_ACTIVE, 4096));
    }
}
