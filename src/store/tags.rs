//! Resource tags: key/value pairs on a project's resources, at most
//! [`MAX_TAGS`] per resource, a key at most once.

use std::collections::BTreeMap;

use rusqlite::params;

use super::{Result, Store};

/// Most tags one resource holds.
pub const MAX_TAGS: usize = 20;

/// What a tag write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagWrite {
    Done,
    /// The resource would hold more than [`MAX_TAGS`]; nothing was written.
    TooMany,
}

impl Store {
    /// Sets `tags` on a resource (a key already there gets the new value),
    /// all or none.
    pub fn put_tags(
        &self,
        project_id: &str,
        resource_type: &str,
        resource_id: &str,
        tags: &[(String, String)],
    ) -> Result<TagWrite> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO tags (project_id, resource_type, resource_id, key, value)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (resource_type, resource_id, key) DO UPDATE SET value = ?5",
            )?;
            for (k, v) in tags {
                st.execute(params![project_id, resource_type, resource_id, k, v])?;
            }
        }
        let held: i64 = tx.query_row(
            "SELECT COUNT(*) FROM tags WHERE resource_type = ?1 AND resource_id = ?2",
            params![resource_type, resource_id],
            |r| r.get(0),
        )?;
        if held as usize > MAX_TAGS {
            return Ok(TagWrite::TooMany);
        }
        tx.commit()?;
        Ok(TagWrite::Done)
    }

    /// Removes the tags of these keys from a resource; a tag is kept when a
    /// value is given and differs from its own.
    pub fn delete_tags(
        &self,
        resource_type: &str,
        resource_id: &str,
        tags: &[(String, Option<String>)],
    ) -> Result<()> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare(
                "DELETE FROM tags WHERE resource_type = ?1 AND resource_id = ?2 AND key = ?3
                   AND (?4 IS NULL OR value = ?4)",
            )?;
            for (k, v) in tags {
                st.execute(params![resource_type, resource_id, k, v])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A resource's tags by key.
    pub fn resource_tags(
        &self,
        resource_type: &str,
        resource_id: &str,
    ) -> Result<Vec<(String, String)>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(
            "SELECT key, value FROM tags WHERE resource_type = ?1 AND resource_id = ?2 ORDER BY key",
        )?;
        let rows = st.query_map(params![resource_type, resource_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every tag of a project's resources of a type: resource id -> key -> value.
    pub fn project_tags(
        &self,
        project_id: &str,
        resource_type: &str,
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(
            "SELECT resource_id, key, value FROM tags WHERE project_id = ?1 AND resource_type = ?2",
        )?;
        let rows = st.query_map(params![project_id, resource_type], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for row in rows {
            let (id, k, v) = row?;
            out.entry(id).or_default().insert(k, v);
        }
        Ok(out)
    }
}
