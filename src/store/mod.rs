//! The control plane's state in SQLite (WAL mode, versioned migrations).
//!
//! Everything the API answers from lives here, so a restarted control plane
//! picks up where it stopped. The SQL is kept to portable forms (no SQLite-only
//! functions in queries) so a PostgreSQL backend can implement the same
//! methods for several control-plane replicas.

mod events;
mod images;
mod migrations;
mod tags;

pub use events::{
    Event, EventFilter, NewEvent, EVENT_CANCELED, EVENT_COMPLETED, EVENT_EXECUTING,
    EVENT_INQUIRING, EVENT_SCHEDULED,
};
pub use images::{
    now_ms, Image, ImageFilter, ImageMember, MemberWrite, IMAGE_ACTIVE, IMAGE_CREATING,
    IMAGE_FAILED, MAX_MEMBERS,
};
pub use tags::{TagWrite, MAX_TAGS};

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension};
use serde::Serialize;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored json is invalid: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("project {0} not found")]
    ProjectNotFound(String),
    #[error("project {0} already exists")]
    ProjectExists(String),
    #[error("store lock poisoned")]
    Poisoned,
    #[error("host {0} not found")]
    NodeNotFound(String),
    #[error(
        "host {0} is alive: delete its server through the API (DeleteCloudPhoneServer) instead"
    )]
    NodeAlive(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A tenant project.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Project {
    pub project_id: String,
    pub name: String,
}

/// A registered host.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub node_id: String,
    pub hostname: String,
    pub agent_url: String,
    pub server_model: String,
    pub server_ip: String,
    pub public_ip: Option<String>,
    pub phone_capacity: u32,
    pub last_seen: i64,
    pub alive: bool,
    /// The server assigned on this host, if bought.
    pub server_id: Option<String>,
    /// A server switched away from this host whose phones its agent has
    /// not deleted yet: the host is not free until it has.
    pub releasing_server: Option<String>,
    /// Kept out of sale by the operator.
    pub cordoned: bool,
}

/// A cloud phone server (a host assigned to a project).
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub server_id: String,
    pub project_id: String,
    pub node_id: String,
    pub server_name: String,
    pub server_model_name: String,
    pub phone_model_name: String,
    pub image_id: String,
    pub keypair_name: String,
    pub status: i32,
    pub network_version: String,
    pub order_id: String,
    pub product_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub vpc_cidr: String,
    pub subnet_cidr: String,
    pub availability_zone: String,
    pub ports: String,
    pub band_width_id: String,
    pub create_dispatched: bool,
    pub create_time: String,
    pub update_time: String,
    pub server_ip: String,
    pub public_ip: Option<String>,
    /// A deletion job of the server runs (its status then reads
    /// [`SERVER_DELETING`]).
    pub deleting: bool,
}

/// What [`Store::forget_node`] did.
#[derive(Debug)]
pub struct Forgotten {
    /// The server the host held, released.
    pub server_id: Option<String>,
    /// The host's unfinished jobs, failed.
    pub failed_jobs: Vec<String>,
}

/// What [`Store::switch_server`] did: the server and its creation job as
/// stored, and the jobs it failed on the host left.
#[derive(Debug)]
pub struct Switched {
    pub server: Server,
    pub job: Job,
    pub failed_jobs: Vec<String>,
}

/// The status of a server whose phones are all made: normal.
pub const SERVER_NORMAL: i32 = 5;

/// The status a server shows while it is being deleted: the reference's
/// "being stopped", the nearest of its codes.
pub const SERVER_DELETING: i32 = 11;

/// A cloud phone.
#[derive(Debug, Clone, PartialEq)]
pub struct Phone {
    pub phone_id: String,
    pub project_id: String,
    pub server_id: String,
    pub phone_name: String,
    pub phone_model_name: String,
    pub image_id: String,
    pub status: i32,
    pub phone_type: i32,
    pub slot: u32,
    pub property: String,
    pub access_infos: String,
    pub traffic_type: String,
    pub create_time: String,
    pub update_time: String,
}

/// A job: one operation on one phone or server.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub request_id: String,
    pub project_id: String,
    pub server_id: String,
    pub phone_id: Option<String>,
    pub node_id: String,
    /// The [`cph_agent::protocol::JobRequest`] as JSON.
    pub request: String,
    pub status: i32,
    pub dispatched: bool,
    pub attempts: u32,
    pub error_code: Option<String>,
    pub error_msg: Option<String>,
    pub execute_msg: Option<String>,
    pub begin_time: String,
    pub end_time: Option<String>,
}

impl Job {
    /// The job `req` just made for the host `node_id`: running, not yet
    /// sent.
    pub fn running(
        req: &cph_agent::protocol::JobRequest,
        project_id: &str,
        node_id: &str,
        now: &str,
    ) -> serde_json::Result<Job> {
        Ok(Job {
            job_id: req.job_id.clone(),
            request_id: req.request_id.clone(),
            project_id: project_id.to_string(),
            server_id: req.server_id.clone(),
            phone_id: req.phone_id.clone(),
            node_id: node_id.to_string(),
            request: serde_json::to_string(req)?,
            status: 1,
            dispatched: false,
            attempts: 0,
            error_code: None,
            error_msg: None,
            execute_msg: None,
            begin_time: now.to_string(),
            end_time: None,
        })
    }
}

/// A bandwidth.
#[derive(Debug, Clone, PartialEq)]
pub struct Bandwidth {
    pub band_width_id: String,
    pub project_id: String,
    pub band_width_name: String,
    pub band_width_size: u32,
    pub band_width_share_type: i32,
    pub band_width_charge_mode: i32,
    pub create_time: String,
    pub update_time: String,
}

/// Filter of a phone listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhoneFilter {
    pub phone_name: Option<String>,
    pub server_id: Option<String>,
    pub status: Option<i32>,
    pub phone_type: Option<i32>,
}

impl PhoneFilter {
    /// Whether the filter lets every phone of the project through.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Filter of a server listing.
#[derive(Debug, Clone, Default)]
pub struct ServerFilter {
    pub server_name: Option<String>,
    pub server_id: Option<String>,
    pub network_version: Option<String>,
}

/// What one bought server is made of, before it is stored.
#[derive(Debug, Clone)]
pub struct NewServer {
    pub server_id: String,
    pub server_name: String,
    pub phones: Vec<(String, String)>,
    /// The agent's `CreateServer` as JSON.
    pub create_request: String,
}

/// A share file system the operator offers a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareFilesystem {
    pub fs_id: String,
    pub project_id: String,
    /// `sfs_turbo`, the one type the SDK names.
    pub kind: String,
    /// The directory where every host has the file system mounted.
    pub source: String,
    pub create_time: String,
}

/// A server's switch to another host (`ChangeCloudPhoneServer`): what it
/// becomes there. Its id, name, project, network and bandwidth stay.
#[derive(Debug, Clone)]
pub struct Switch {
    pub server_id: String,
    pub phone_model_name: String,
    pub image_id: String,
    pub keypair_name: String,
    /// The ports as JSON.
    pub ports: String,
    /// The phones' properties as JSON.
    pub property: String,
    /// The new phones (id, name), in slot order.
    pub phones: Vec<(String, String)>,
    /// The job that makes the server on its new host; its `node_id` is
    /// filled in with the host chosen.
    pub job: Job,
    /// The id of the job that deletes the server's phones from the host it
    /// leaves.
    pub release_job: String,
}

/// An order to assign hosts.
#[derive(Debug, Clone)]
pub struct Order {
    pub project_id: String,
    pub server_model_name: String,
    pub phone_model_name: String,
    pub image_id: String,
    pub keypair_name: String,
    pub network_version: String,
    pub order_id: String,
    pub product_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub vpc_cidr: String,
    pub subnet_cidr: String,
    pub availability_zone: String,
    pub ports: String,
    pub band_width_id: String,
    pub property: String,
    pub servers: Vec<NewServer>,
    /// The bandwidth the order makes (none when it joins an existing one),
    /// recorded with its servers or not at all.
    pub new_bandwidth: Option<Bandwidth>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Microseconds since the epoch: the ordering key of rows (newest first).
fn now_seq() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn utc_string(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The Unix time of `YYYY-MM-DDTHH:MM:SSZ` ([`utc_string`]'s form).
pub fn parse_utc(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 59 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    // A date that does not exist (February 30th) does not print back.
    (utc_string(secs) == s).then_some(secs)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// days-from-civil, the inverse of [`utc_string`]'s civil-from-days).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Current UTC time as the API prints it.
pub fn now_string() -> String {
    utc_string(now_secs())
}

/// A fresh 32-hex-digit identifier.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The SQLite store.
pub struct Store {
    conn: Mutex<Connection>,
    positions: Mutex<PositionCache>,
}

/// One dispatch attempt of a job (`?1`) that reached its agent or not
/// (`?2`), answering the job's attempts.
const MARK_DISPATCHED: &str =
    "UPDATE jobs SET dispatched = ?2, attempts = attempts + 1 WHERE job_id = ?1 RETURNING attempts";

/// Phone listings at least this deep are served from remembered positions.
pub const DEEP_OFFSET: u32 = 1_000;

/// The WHERE clause of a phone listing naming only the filters given (so
/// an unfiltered listing is read from the project index alone), and its
/// values as `?1`, `?2`, ...
fn phone_filter(project_id: &str, f: &PhoneFilter) -> (String, Vec<Value>) {
    let mut sql = String::from("project_id = ?1");
    let mut values = vec![Value::from(project_id.to_string())];
    let mut add = |clause: &str, v: Value| {
        values.push(v);
        sql.push_str(" AND ");
        sql.push_str(&clause.replace('?', &format!("?{}", values.len())));
    };
    if let Some(n) = &f.phone_name {
        add(
            "phone_name LIKE ? ESCAPE '\\'",
            Value::from(like_pattern(n)),
        );
    }
    if let Some(id) = &f.server_id {
        add("server_id = ?", Value::from(id.clone()));
    }
    if let Some(st) = f.status {
        add("status = ?", Value::from(st));
    }
    if let Some(t) = f.phone_type {
        add("type = ?", Value::from(t));
    }
    (sql, values)
}

type ListKey = (String, PhoneFilter);

/// The positions of a few deep phone listings, each with the revision of
/// the project's phones it was read at; least recently used goes first.
#[derive(Default)]
struct PositionCache {
    entries: Vec<PositionEntry>,
    clock: u64,
}

struct PositionEntry {
    key: ListKey,
    rev: (i64, i64),
    positions: Arc<Vec<(i64, i64)>>,
    used: u64,
}

impl PositionCache {
    /// Listings remembered at once (100,000 phones take 1.6 MB each).
    const ENTRIES: usize = 8;

    fn get(&mut self, key: &ListKey, rev: (i64, i64)) -> Option<Arc<Vec<(i64, i64)>>> {
        self.clock += 1;
        let e = self
            .entries
            .iter_mut()
            .find(|e| &e.key == key && e.rev == rev)?;
        e.used = self.clock;
        Some(e.positions.clone())
    }

    fn put(&mut self, key: ListKey, rev: (i64, i64), positions: Arc<Vec<(i64, i64)>>) {
        self.clock += 1;
        self.entries.retain(|e| e.key != key);
        if self.entries.len() >= Self::ENTRIES {
            if let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) {
                self.entries.swap_remove(i);
            }
        }
        self.entries.push(PositionEntry {
            key,
            rev,
            positions,
            used: self.clock,
        });
    }
}

/// The servers of a project's listing: `?1` the project, `?2` a name
/// pattern, `?3` a server id, `?4` a network version (each unset when
/// NULL).
const SERVER_LISTING: &str = "FROM servers s JOIN nodes n ON n.node_id = s.node_id
     WHERE s.project_id = ?1
       AND (?2 IS NULL OR s.server_name LIKE ?2 ESCAPE '\\')
       AND (?3 IS NULL OR s.server_id = ?3)
       AND (?4 IS NULL OR s.network_version = ?4)";

const SERVER_COLS: &str =
    "s.server_id, s.project_id, s.node_id, s.server_name, s.server_model_name, \
    s.phone_model_name, s.image_id, s.keypair_name, s.status, s.network_version, s.order_id, \
    s.product_id, s.vpc_id, s.subnet_id, s.vpc_cidr, s.subnet_cidr, s.availability_zone, s.ports, \
    s.band_width_id, s.create_dispatched, s.create_time, s.update_time, n.server_ip, n.public_ip, \
    EXISTS (SELECT 1 FROM jobs j WHERE j.server_id = s.server_id AND j.status = 1 \
        AND json_extract(j.request, '$.kind') = 'delete_server')";

/// A host that can be bought (`n` a row of `nodes`): its agent answers,
/// no server is on it and none is still leaving it, and the operator has
/// not cordoned it.
const FREE_HOST: &str = "n.alive = 1 AND n.releasing_server IS NULL AND n.cordoned = 0
    AND NOT EXISTS (SELECT 1 FROM servers s WHERE s.node_id = n.node_id)";

const PHONE_COLS: &str =
    "phone_id, project_id, server_id, phone_name, phone_model_name, image_id, \
    status, type, slot, property, access_infos, traffic_type, create_time, update_time";

const JOB_COLS: &str = "job_id, request_id, project_id, server_id, phone_id, node_id, request, \
    status, dispatched, attempts, error_code, error_msg, execute_msg, begin_time, end_time";

fn server_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Server> {
    let deleting = r.get::<_, i64>(24)? != 0;
    Ok(Server {
        server_id: r.get(0)?,
        project_id: r.get(1)?,
        node_id: r.get(2)?,
        server_name: r.get(3)?,
        server_model_name: r.get(4)?,
        phone_model_name: r.get(5)?,
        image_id: r.get(6)?,
        keypair_name: r.get(7)?,
        status: if deleting { SERVER_DELETING } else { r.get(8)? },
        network_version: r.get(9)?,
        order_id: r.get(10)?,
        product_id: r.get(11)?,
        vpc_id: r.get(12)?,
        subnet_id: r.get(13)?,
        vpc_cidr: r.get(14)?,
        subnet_cidr: r.get(15)?,
        availability_zone: r.get(16)?,
        ports: r.get(17)?,
        band_width_id: r.get(18)?,
        create_dispatched: r.get::<_, i64>(19)? != 0,
        create_time: r.get(20)?,
        update_time: r.get(21)?,
        server_ip: r.get(22)?,
        public_ip: r.get(23)?,
        deleting,
    })
}

fn phone_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Phone> {
    Ok(Phone {
        phone_id: r.get(0)?,
        project_id: r.get(1)?,
        server_id: r.get(2)?,
        phone_name: r.get(3)?,
        phone_model_name: r.get(4)?,
        image_id: r.get(5)?,
        status: r.get(6)?,
        phone_type: r.get(7)?,
        slot: r.get(8)?,
        property: r.get(9)?,
        access_infos: r.get(10)?,
        traffic_type: r.get(11)?,
        create_time: r.get(12)?,
        update_time: r.get(13)?,
    })
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        job_id: r.get(0)?,
        request_id: r.get(1)?,
        project_id: r.get(2)?,
        server_id: r.get(3)?,
        phone_id: r.get(4)?,
        node_id: r.get(5)?,
        request: r.get(6)?,
        status: r.get(7)?,
        dispatched: r.get::<_, i64>(8)? != 0,
        attempts: r.get(9)?,
        error_code: r.get(10)?,
        error_msg: r.get(11)?,
        execute_msg: r.get(12)?,
        begin_time: r.get(13)?,
        end_time: r.get(14)?,
    })
}

fn node_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Node> {
    Ok(Node {
        node_id: r.get(0)?,
        hostname: r.get(1)?,
        agent_url: r.get(2)?,
        server_model: r.get(3)?,
        server_ip: r.get(4)?,
        public_ip: r.get(5)?,
        phone_capacity: r.get(6)?,
        last_seen: r.get(7)?,
        alive: r.get::<_, i64>(8)? != 0,
        server_id: r.get(9)?,
        releasing_server: r.get(10)?,
        cordoned: r.get::<_, i64>(11)? != 0,
    })
}

const NODE_COLS: &str =
    "n.node_id, n.hostname, n.agent_url, n.server_model, n.server_ip, n.public_ip, \
    n.phone_capacity, n.last_seen, n.alive, s.server_id, n.releasing_server, n.cordoned";

/// Escapes `%`, `_` and `\` for a `LIKE ... ESCAPE '\'` fuzzy match.
fn like_pattern(s: &str) -> String {
    let mut out = String::from("%");
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Removes a server's phones, tags and row, and its bandwidth once no
/// other server uses it.
fn drop_server(tx: &rusqlite::Transaction<'_>, server_id: &str) -> Result<()> {
    let band: Option<String> = tx
        .query_row(
            "SELECT band_width_id FROM servers WHERE server_id = ?1",
            [server_id],
            |r| r.get(0),
        )
        .optional()?;
    tx.execute("DELETE FROM phones WHERE server_id = ?1", [server_id])?;
    tx.execute("DELETE FROM servers WHERE server_id = ?1", [server_id])?;
    tx.execute("DELETE FROM tags WHERE resource_id = ?1", [server_id])?;
    tx.execute(
        "DELETE FROM server_share_filesystems WHERE server_id = ?1",
        [server_id],
    )?;
    if let Some(band) = band.filter(|b| !b.is_empty()) {
        tx.execute(
            "DELETE FROM bandwidths WHERE band_width_id = ?1
                   AND NOT EXISTS (SELECT 1 FROM servers WHERE band_width_id = ?1)",
            [&band],
        )?;
    }
    Ok(())
}

/// The phones of a server being made: all being created (1), in slot
/// order from `seq`.
struct NewPhones<'a> {
    project_id: &'a str,
    server_id: &'a str,
    phone_model_name: &'a str,
    image_id: &'a str,
    /// Their properties as JSON.
    property: &'a str,
    /// (id, name) per slot.
    phones: &'a [(String, String)],
    now: &'a str,
    seq: i64,
}

fn insert_new_phones(tx: &rusqlite::Transaction<'_>, p: &NewPhones<'_>) -> Result<()> {
    let mut st = tx.prepare(&format!(
        "INSERT INTO phones ({PHONE_COLS}, seq) VALUES
         (?1, ?2, ?3, ?4, ?5, ?6, 1, 0, ?7, ?8, '[]', 'direct', ?9, ?9, ?10)"
    ))?;
    for (slot, (phone_id, phone_name)) in p.phones.iter().enumerate() {
        st.execute(params![
            phone_id,
            p.project_id,
            p.server_id,
            phone_name,
            p.phone_model_name,
            p.image_id,
            slot as u32,
            p.property,
            p.now,
            p.seq + slot as i64
        ])?;
    }
    Ok(())
}

/// Why a new job can no longer run where it was made for (see
/// [`Store::insert_jobs`]): its code and message.
fn moved_since(tx: &rusqlite::Transaction<'_>, j: &Job) -> Result<Option<(&'static str, String)>> {
    let in_place: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM servers WHERE server_id = ?1 AND node_id = ?2)
            AND (?3 IS NULL OR EXISTS (SELECT 1 FROM phones WHERE phone_id = ?3 AND server_id = ?1))",
        params![j.server_id, j.node_id, j.phone_id],
        |r| r.get(0),
    )?;
    if !in_place {
        let what = match &j.phone_id {
            Some(p) => format!("phone {p}"),
            None => format!("server {}", j.server_id),
        };
        return Ok(Some((
            "CPS.0054",
            format!(
                "{what} left its host as the job was made (its server was switched to \
                 another host or deleted); nothing was run"
            ),
        )));
    }
    let deleting: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE server_id = ?1 AND status = 1
            AND json_extract(request, '$.kind') = 'delete_server')",
        [&j.server_id],
        |r| r.get(0),
    )?;
    Ok(deleting.then(|| {
        (
            "CPS.0105",
            format!("server {} is being deleted; nothing was run", j.server_id),
        )
    }))
}

/// Fails the unfinished jobs of a host with CPS.0054 and `why`; their ids.
fn fail_node_jobs(tx: &rusqlite::Transaction<'_>, node_id: &str, why: &str) -> Result<Vec<String>> {
    let mut st = tx.prepare(
        "UPDATE jobs SET status = -1, error_code = 'CPS.0054', error_msg = ?2, end_time = ?3
         WHERE node_id = ?1 AND status = 1 RETURNING job_id",
    )?;
    let ids = st.query_map(params![node_id, why, now_string()], |r| r.get(0))?;
    Ok(ids.collect::<rusqlite::Result<_>>()?)
}

/// Where the `seq` of new jobs starts: the time in microseconds, and after
/// every unfinished job whatever the clock did since they were made (set
/// back, new jobs would be sent before older ones of the same phone).
fn next_job_seq(tx: &rusqlite::Transaction<'_>) -> Result<i64> {
    let last: Option<i64> =
        tx.query_row("SELECT MAX(seq) FROM jobs WHERE status = 1", [], |r| {
            r.get(0)
        })?;
    Ok(last.map_or(now_seq(), |l| now_seq().max(l + 1)))
}

/// Inserts `jobs` in order within `tx`.
fn insert_jobs_in(tx: &rusqlite::Transaction<'_>, jobs: &[Job]) -> Result<()> {
    let mut st = tx.prepare(&format!(
        "INSERT INTO jobs ({JOB_COLS}, seq) VALUES
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
    ))?;
    let base = next_job_seq(tx)?;
    for (i, j) in jobs.iter().enumerate() {
        st.execute(params![
            j.job_id,
            j.request_id,
            j.project_id,
            j.server_id,
            j.phone_id,
            j.node_id,
            j.request,
            j.status,
            j.dispatched as i64,
            j.attempts,
            j.error_code,
            j.error_msg,
            j.execute_msg,
            j.begin_time,
            j.end_time,
            base + i as i64
        ])?;
    }
    Ok(())
}

const BANDWIDTH_COLS: &str = "band_width_id, project_id, band_width_name, band_width_size,
    band_width_share_type, band_width_charge_mode, create_time, update_time";

/// A bandwidth from a row of [`BANDWIDTH_COLS`].
fn bandwidth_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Bandwidth> {
    Ok(Bandwidth {
        band_width_id: r.get(0)?,
        project_id: r.get(1)?,
        band_width_name: r.get(2)?,
        band_width_size: r.get(3)?,
        band_width_share_type: r.get(4)?,
        band_width_charge_mode: r.get(5)?,
        create_time: r.get(6)?,
        update_time: r.get(7)?,
    })
}

fn insert_bandwidth_in(c: &rusqlite::Connection, b: &Bandwidth) -> Result<()> {
    c.execute(
        "INSERT INTO bandwidths (band_width_id, project_id, band_width_name, band_width_size,
           band_width_share_type, band_width_charge_mode, seq, create_time, update_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            b.band_width_id,
            b.project_id,
            b.band_width_name,
            b.band_width_size,
            b.band_width_share_type,
            b.band_width_charge_mode,
            now_seq(),
            b.create_time,
            b.update_time
        ],
    )?;
    Ok(())
}

/// The password hash of stores made before PBKDF2: SHA-256 of salt and
/// password. Such a hash is still accepted, and replaced by a PBKDF2 one at
/// the user's next login.
fn legacy_password_hash(salt: &str, password: &str) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(salt.as_bytes());
    h.update(password.as_bytes());
    hex::encode(h.finalize())
}

impl Store {
    /// Opens (creating) `dir/cph.db` and brings its schema up to date.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        Self::open(&dir.join("cph.db"))
    }

    /// Opens (creating) the database file and migrates it.
    ///
    /// Several processes may open it at once (`cph serve` and `cph admin`):
    /// the connection's transactions (all of them write) begin `IMMEDIATE`,
    /// taking the write lock first (waited for up to the busy timeout). A deferred one that
    /// read first could not write once another connection had committed
    /// meanwhile (`SQLITE_BUSY_SNAPSHOT`, which no timeout waits out).
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Deep listings walk the phone index; keep it in memory.
        conn.pragma_update(None, "cache_size", -65_536)?;
        // Listings prepare one statement per combination of filters.
        conn.set_prepared_statement_cache_capacity(64);
        let store = Self {
            conn: Mutex::new(conn),
            positions: Mutex::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Writes a consistent copy of the whole database to `to` (`VACUUM
    /// INTO`), while the control plane may run; `to` must not exist.
    pub fn backup(&self, to: &Path) -> Result<()> {
        if to.exists() {
            return Err(StoreError::DataDir {
                path: to.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the backup file exists already",
                ),
            });
        }
        let path = to.to_str().ok_or_else(|| StoreError::DataDir {
            path: to.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"),
        })?;
        self.db()?.execute("VACUUM INTO ?1", [path])?;
        Ok(())
    }

    fn db(&self) -> Result<MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    fn migrate(&self) -> Result<()> {
        let mut c = self.db()?;
        c.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
        let current: i64 = c.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )?;
        for (i, sql) in migrations::MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= current {
                continue;
            }
            let tx = c.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [version],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> Result<i64> {
        Ok(self
            .db()?
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?)
    }

    // ---- tenants -------------------------------------------------------

    /// Creates a project; its id is 32 hex digits like the cloud's.
    pub fn create_project(&self, name: &str) -> Result<Project> {
        let c = self.db()?;
        let exists: Option<String> = c
            .query_row(
                "SELECT project_id FROM projects WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_some() {
            return Err(StoreError::ProjectExists(name.to_string()));
        }
        let project_id = new_id();
        c.execute(
            "INSERT INTO projects (project_id, name, create_time) VALUES (?1, ?2, ?3)",
            params![project_id, name, now_string()],
        )?;
        Ok(Project {
            project_id,
            name: name.to_string(),
        })
    }

    /// A project by id or by name.
    pub fn project(&self, id_or_name: &str) -> Result<Option<Project>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT project_id, name FROM projects WHERE project_id = ?1 OR name = ?1",
                [id_or_name],
                |r| {
                    Ok(Project {
                        project_id: r.get(0)?,
                        name: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every project.
    pub fn projects(&self) -> Result<Vec<Project>> {
        let c = self.db()?;
        let mut st = c.prepare("SELECT project_id, name FROM projects ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Project {
                project_id: r.get(0)?,
                name: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Creates an AK/SK pair for a project.
    pub fn create_credential(&self, project_id: &str) -> Result<(String, String)> {
        if self.project(project_id)?.is_none() {
            return Err(StoreError::ProjectNotFound(project_id.to_string()));
        }
        let ak = new_id()[..20].to_uppercase();
        let sk = format!("{}{}", new_id(), &new_id()[..8]);
        self.db()?.execute(
            "INSERT INTO credentials (access_key, secret_key, project_id, create_time) VALUES (?1, ?2, ?3, ?4)",
            params![ak, sk, project_id, now_string()],
        )?;
        Ok((ak, sk))
    }

    /// The secret key and project of an access key.
    pub fn credential(&self, ak: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT secret_key, project_id FROM credentials WHERE access_key = ?1",
                [ak],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Creates (or replaces the password of) an IAM user in a project. The
    /// password is kept as a salted PBKDF2-HMAC-SHA256 hash.
    pub fn create_user(&self, name: &str, password: &str, project_id: &str) -> Result<()> {
        if self.project(project_id)?.is_none() {
            return Err(StoreError::ProjectNotFound(project_id.to_string()));
        }
        let salt = new_id();
        let hash = crate::auth::token::hash_password(password, salt.as_bytes());
        self.db()?.execute(
            "INSERT INTO users (name, password_hash, salt, project_id) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash,
             salt = excluded.salt, project_id = excluded.project_id",
            params![name, hash, salt, project_id],
        )?;
        Ok(())
    }

    /// The project of a user whose password matches. A hash of the former
    /// scheme that matches is replaced by a PBKDF2 one.
    pub fn check_user(&self, name: &str, password: &str) -> Result<Option<String>> {
        let row: Option<(String, String, String)> = self
            .db()?
            .query_row(
                "SELECT password_hash, salt, project_id FROM users WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((hash, salt, project)) = row else {
            // As long as a wrong password, so the answer's time does not
            // tell which user names exist.
            std::hint::black_box(crate::auth::token::hash_password(
                password,
                b"cph-no-such-user",
            ));
            return Ok(None);
        };
        if hash.starts_with("pbkdf2-sha256$") {
            let same = crate::auth::token::verify_password(password, &hash).unwrap_or(false);
            return Ok(same.then_some(project));
        }
        let given = legacy_password_hash(&salt, password);
        if !crate::auth::signing::constant_time_eq(given.as_bytes(), hash.as_bytes()) {
            return Ok(None);
        }
        let upgraded = crate::auth::token::hash_password(password, salt.as_bytes());
        self.db()?.execute(
            "UPDATE users SET password_hash = ?1 WHERE name = ?2 AND password_hash = ?3",
            params![upgraded, name, hash],
        )?;
        Ok(Some(project))
    }

    /// Records an issued token: its SHA-256, not the token, which only its
    /// holder keeps.
    pub fn put_token(
        &self,
        token: &str,
        user: &str,
        project_id: &str,
        expires_at: i64,
    ) -> Result<()> {
        let c = self.db()?;
        c.execute("DELETE FROM tokens WHERE expires_at < ?1", [now_secs()])?;
        c.execute(
            "INSERT OR REPLACE INTO tokens (token, user_name, project_id, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![crate::auth::token::hash_token(token), user, project_id, expires_at],
        )?;
        Ok(())
    }

    /// The project of a token that has not expired.
    pub fn token_project(&self, token: &str) -> Result<Option<String>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT project_id FROM tokens WHERE token = ?1 AND expires_at > ?2",
                params![crate::auth::token::hash_token(token), now_secs()],
                |r| r.get(0),
            )
            .optional()?)
    }

    // ---- fleet ---------------------------------------------------------

    /// Records a registration (insert or refresh) and marks the node alive.
    pub fn upsert_node(&self, inv: &cph_agent::protocol::Inventory) -> Result<()> {
        let c = self.db()?;
        c.execute(
            "INSERT INTO nodes (node_id, hostname, agent_url, server_model, server_ip, public_ip,
                phone_capacity, inventory, last_seen, alive)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1)
             ON CONFLICT(node_id) DO UPDATE SET hostname = excluded.hostname,
                agent_url = excluded.agent_url, server_model = excluded.server_model,
                server_ip = excluded.server_ip, public_ip = excluded.public_ip,
                phone_capacity = excluded.phone_capacity, inventory = excluded.inventory,
                last_seen = excluded.last_seen, alive = 1",
            params![
                inv.node_id,
                inv.hostname,
                inv.agent_url,
                inv.server_model,
                inv.server_ip,
                inv.public_ip,
                inv.phone_capacity,
                serde_json::to_string(inv)?,
                now_secs()
            ],
        )?;
        Ok(())
    }

    /// Refreshes a node's liveness; false when the node is unknown.
    pub fn touch_node(&self, node_id: &str) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE nodes SET last_seen = ?2, alive = 1 WHERE node_id = ?1",
            params![node_id, now_secs()],
        )?;
        Ok(n > 0)
    }

    /// A node with its assigned server.
    pub fn node(&self, node_id: &str) -> Result<Option<Node>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {NODE_COLS} FROM nodes n LEFT JOIN servers s ON s.node_id = n.node_id WHERE n.node_id = ?1"
        );
        Ok(c.query_row(&sql, [node_id], node_row).optional()?)
    }

    /// The inventory a node last registered with.
    pub fn node_inventory(&self, node_id: &str) -> Result<Option<cph_agent::protocol::Inventory>> {
        let c = self.db()?;
        let text: Option<String> = c
            .query_row(
                "SELECT inventory FROM nodes WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// A node's storage pools as its agent last measured them (kept in
    /// its inventory).
    pub fn set_node_pools(
        &self,
        node_id: &str,
        pools: &[cph_agent::protocol::PoolState],
    ) -> Result<()> {
        self.db()?.execute(
            "UPDATE nodes SET inventory = json_set(inventory, '$.pools', json(?2))
             WHERE node_id = ?1",
            params![node_id, serde_json::to_string(pools)?],
        )?;
        Ok(())
    }

    /// Every node.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {NODE_COLS} FROM nodes n LEFT JOIN servers s ON s.node_id = n.node_id ORDER BY n.node_id"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], node_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts every alive node as heard from now: the control plane was
    /// away itself (restarted), so the silence since is its own, not the
    /// agents'. Returns how many.
    pub fn restart_liveness(&self) -> Result<usize> {
        Ok(self.db()?.execute(
            "UPDATE nodes SET last_seen = ?1 WHERE alive = 1",
            [now_secs()],
        )?)
    }

    /// Marks nodes silent since before `deadline` dead, their servers abnormal
    /// (2) and their phones abnormal (-7); fails their unfinished jobs.
    /// Returns the node ids newly marked and the ids of the jobs failed.
    pub fn mark_silent_nodes(&self, deadline: i64) -> Result<(Vec<String>, Vec<String>)> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let ids: Vec<String> = {
            let mut st =
                tx.prepare("SELECT node_id FROM nodes WHERE alive = 1 AND last_seen < ?1")?;
            let rows = st.query_map([deadline], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = now_string();
        let mut failed = Vec::new();
        for id in &ids {
            tx.execute("UPDATE nodes SET alive = 0 WHERE node_id = ?1", [id])?;
            tx.execute(
                "UPDATE servers SET status = 2, update_time = ?2 WHERE node_id = ?1",
                params![id, now],
            )?;
            tx.execute(
                "UPDATE phones SET status = -7, update_time = ?2
                 WHERE server_id IN (SELECT server_id FROM servers WHERE node_id = ?1)",
                params![id, now],
            )?;
            failed.extend(fail_node_jobs(
                &tx,
                id,
                "agent of the server stopped answering",
            )?);
        }
        tx.commit()?;
        Ok((ids, failed))
    }

    /// Applies a phone state an agent reported: status, access, traffic and
    /// the image it runs (a reset may have changed it).
    pub fn apply_phone_state(
        &self,
        node_id: &str,
        p: &cph_agent::protocol::PhoneState,
        status: i32,
    ) -> Result<()> {
        let c = self.db()?;
        c.execute(
            "UPDATE phones SET status = ?3, access_infos = ?4, traffic_type = ?5, update_time = ?6,
                image_id = COALESCE(NULLIF(?7, ''), image_id)
             WHERE phone_id = ?1 AND server_id IN (SELECT server_id FROM servers WHERE node_id = ?2)
               AND (status != ?3 OR access_infos != ?4 OR traffic_type != ?5
                    OR (?7 != '' AND image_id != ?7))",
            params![
                p.phone_id,
                node_id,
                status,
                serde_json::to_string(&p.access_infos)?,
                p.traffic_type,
                now_string(),
                p.image_id
            ],
        )?;
        Ok(())
    }

    /// Records the shared applications a node's agent collected now.
    pub fn set_share_apps(
        &self,
        node_id: &str,
        apps: &[cph_agent::protocol::ShareApp],
    ) -> Result<()> {
        self.db()?.execute(
            "UPDATE nodes SET share_apps = ?2, share_apps_time = ?3 WHERE node_id = ?1",
            params![node_id, serde_json::to_string(apps)?, now_string()],
        )?;
        Ok(())
    }

    /// The shared applications of a node and when they were collected
    /// (`None` before its agent reported any).
    pub fn share_apps(
        &self,
        node_id: &str,
    ) -> Result<Option<(String, Vec<cph_agent::protocol::ShareApp>)>> {
        let row: Option<(String, String)> = self
            .db()?
            .query_row(
                "SELECT share_apps_time, share_apps FROM nodes WHERE node_id = ?1",
                [node_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            Some((time, apps)) if !time.is_empty() => {
                Ok(Some((time, serde_json::from_str(&apps)?)))
            }
            _ => Ok(None),
        }
    }

    /// Records the encoding server state a node's agent reports for its
    /// server (nothing when the server is not on that node).
    pub fn set_encoder(&self, node_id: &str, e: &cph_agent::protocol::EncoderState) -> Result<()> {
        self.db()?.execute(
            "UPDATE servers SET encoder_status = ?3, encoder_access_infos = ?4
             WHERE server_id = ?2 AND node_id = ?1",
            params![
                node_id,
                e.server_id,
                e.status,
                serde_json::to_string(&e.access_infos)?
            ],
        )?;
        Ok(())
    }

    /// The last reported state of a server's encoding server (status 0,
    /// being created, and no ports before any report).
    pub fn encoder(&self, server_id: &str) -> Result<cph_agent::protocol::EncoderState> {
        let row: Option<(i32, String)> = self
            .db()?
            .query_row(
                "SELECT encoder_status, encoder_access_infos FROM servers WHERE server_id = ?1",
                [server_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (status, access) = row.unwrap_or((0, "[]".into()));
        Ok(cph_agent::protocol::EncoderState {
            server_id: server_id.to_string(),
            status,
            access_infos: serde_json::from_str(&access)?,
        })
    }

    /// Recomputes the server status of a node: normal (5) once every phone
    /// runs or is stopped, creating (1) while any is being created; a BMS
    /// without phones (v2.1) is normal once its agent took it.
    pub fn refresh_server_status(&self, node_id: &str) -> Result<()> {
        let c = self.db()?;
        let row: Option<(String, i32, bool)> = c
            .query_row(
                "SELECT server_id, status, phone_model_name = '' AND create_dispatched = 1
                 FROM servers WHERE node_id = ?1",
                [node_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((server_id, status, bms_made)) = row else {
            return Ok(());
        };
        let (total, creating): (i64, i64) = c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status IN (0, 1) THEN 1 ELSE 0 END), 0)
             FROM phones WHERE server_id = ?1",
            [&server_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let next = if bms_made || (total > 0 && creating == 0) {
            SERVER_NORMAL
        } else if status == 2 {
            1
        } else {
            status
        };
        let next = if next == 0 && creating > 0 { 1 } else { next };
        if next != status {
            c.execute(
                "UPDATE servers SET status = ?2, update_time = ?3 WHERE server_id = ?1",
                params![server_id, next, now_string()],
            )?;
        }
        Ok(())
    }

    // ---- servers -------------------------------------------------------

    /// Assigns free alive hosts of the order's model, all or none, and
    /// creates their phone rows. Returns `Ok(None)` when too few are free.
    pub fn assign_servers(&self, order: &Order) -> Result<Option<Vec<Server>>> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let free: Vec<(String, u32)> = {
            let mut st = tx.prepare(&format!(
                "SELECT n.node_id, n.phone_capacity FROM nodes n
                 WHERE n.server_model = ?1 AND {FREE_HOST}
                 ORDER BY n.node_id LIMIT ?2"
            ))?;
            let rows = st.query_map(
                params![order.server_model_name, order.servers.len() as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if free.len() < order.servers.len() {
            return Ok(None);
        }
        let now = now_string();
        let base = now_seq();
        for (i, (srv, (node_id, _))) in order.servers.iter().zip(free.iter()).enumerate() {
            tx.execute(
                "INSERT INTO servers (server_id, project_id, node_id, seq, server_name,
                    server_model_name, phone_model_name, image_id, keypair_name, status,
                    network_version, order_id, product_id, vpc_id, subnet_id, vpc_cidr,
                    subnet_cidr, availability_zone, ports, band_width_id, create_time, update_time,
                    create_request)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17, ?18, ?19, ?20, ?20, ?21)",
                params![
                    srv.server_id,
                    order.project_id,
                    node_id,
                    base + i as i64 * 1000,
                    srv.server_name,
                    order.server_model_name,
                    order.phone_model_name,
                    order.image_id,
                    order.keypair_name,
                    order.network_version,
                    order.order_id,
                    order.product_id,
                    order.vpc_id,
                    order.subnet_id,
                    order.vpc_cidr,
                    order.subnet_cidr,
                    order.availability_zone,
                    order.ports,
                    order.band_width_id,
                    now,
                    srv.create_request
                ],
            )?;
            insert_new_phones(
                &tx,
                &NewPhones {
                    project_id: &order.project_id,
                    server_id: &srv.server_id,
                    phone_model_name: &order.phone_model_name,
                    image_id: &order.image_id,
                    property: &order.property,
                    phones: &srv.phones,
                    now: &now,
                    seq: base + i as i64 * 1000,
                },
            )?;
        }
        if let Some(b) = &order.new_bandwidth {
            insert_bandwidth_in(&tx, b)?;
        }
        tx.commit()?;
        drop(c);
        let mut out = Vec::new();
        for srv in &order.servers {
            if let Some(s) = self.server(&order.project_id, &srv.server_id)? {
                out.push(s);
            }
        }
        Ok(Some(out))
    }

    /// How many alive hosts of each server model hold no server (can be
    /// bought).
    pub fn free_hosts_by_model(&self) -> Result<std::collections::BTreeMap<String, u32>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(&format!(
            "SELECT n.server_model, COUNT(*) FROM nodes n WHERE {FREE_HOST}
             GROUP BY n.server_model"
        ))?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Servers whose CreateServer has not reached their agent yet.
    pub fn servers_to_create(&self) -> Result<Vec<Server>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {SERVER_COLS} FROM servers s JOIN nodes n ON n.node_id = s.node_id
             WHERE s.create_dispatched = 0 AND n.alive = 1"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], server_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The stored `CreateServer` JSON of a server.
    pub fn server_create_request(&self, server_id: &str) -> Result<Option<String>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT create_request FROM servers WHERE server_id = ?1",
                [server_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Records that a server's CreateServer reached its agent (which has
    /// then made a BMS without phones whole: it is normal).
    pub fn mark_server_created(&self, server_id: &str) -> Result<()> {
        self.db()?.execute(
            "UPDATE servers SET create_dispatched = 1, status = CASE
                 WHEN status = 0 AND phone_model_name = '' THEN 5
                 WHEN status = 0 THEN 1 ELSE status END
             WHERE server_id = ?1",
            [server_id],
        )?;
        Ok(())
    }

    /// A project's server.
    pub fn server(&self, project_id: &str, server_id: &str) -> Result<Option<Server>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {SERVER_COLS} FROM servers s JOIN nodes n ON n.node_id = s.node_id
             WHERE s.project_id = ?1 AND s.server_id = ?2"
        );
        Ok(
            c.query_row(&sql, params![project_id, server_id], server_row)
                .optional()?,
        )
    }

    /// A server, whichever project has it (the operator's view).
    pub fn server_by_id(&self, server_id: &str) -> Result<Option<Server>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {SERVER_COLS} FROM servers s JOIN nodes n ON n.node_id = s.node_id
             WHERE s.server_id = ?1"
        );
        Ok(c.query_row(&sql, params![server_id], server_row)
            .optional()?)
    }

    /// A project's servers, newest first.
    pub fn list_servers(
        &self,
        project_id: &str,
        f: &ServerFilter,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<Server>> {
        let c = self.db()?;
        let sql =
            format!("SELECT {SERVER_COLS} {SERVER_LISTING} ORDER BY s.seq DESC LIMIT ?5 OFFSET ?6");
        let mut st = c.prepare_cached(&sql)?;
        let rows = st.query_map(
            params![
                project_id,
                f.server_name.as_deref().map(like_pattern),
                f.server_id,
                f.network_version,
                limit,
                offset
            ],
            server_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many servers a listing has in all.
    pub fn count_servers(&self, project_id: &str, f: &ServerFilter) -> Result<u64> {
        let c = self.db()?;
        let mut st = c.prepare_cached(&format!("SELECT COUNT(*) {SERVER_LISTING}"))?;
        Ok(st.query_row(
            params![
                project_id,
                f.server_name.as_deref().map(like_pattern),
                f.server_id,
                f.network_version,
            ],
            |r| r.get(0),
        )?)
    }

    /// Renames a server.
    pub fn rename_server(&self, project_id: &str, server_id: &str, name: &str) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE servers SET server_name = ?3, update_time = ?4 WHERE project_id = ?1 AND server_id = ?2",
            params![project_id, server_id, name, now_string()],
        )?;
        Ok(n > 0)
    }

    /// Changes a server's model and phone model names.
    pub fn change_server_model(
        &self,
        project_id: &str,
        server_id: &str,
        server_model: &str,
        phone_model: &str,
    ) -> Result<()> {
        let c = self.db()?;
        c.execute(
            "UPDATE servers SET server_model_name = ?3, phone_model_name = ?4, update_time = ?5
             WHERE project_id = ?1 AND server_id = ?2",
            params![
                project_id,
                server_id,
                server_model,
                phone_model,
                now_string()
            ],
        )?;
        c.execute(
            "UPDATE phones SET phone_model_name = ?3 WHERE project_id = ?1 AND server_id = ?2",
            params![project_id, server_id, phone_model],
        )?;
        Ok(())
    }

    /// Sets a server's keypair name.
    pub fn set_server_keypair(&self, project_id: &str, server_id: &str, name: &str) -> Result<()> {
        self.db()?.execute(
            "UPDATE servers SET keypair_name = ?3, update_time = ?4 WHERE project_id = ?1 AND server_id = ?2",
            params![project_id, server_id, name, now_string()],
        )?;
        Ok(())
    }

    /// Forgets a deleted server: its phones, its row, its tags, and the bandwidth
    /// bought with it once no other server uses it. Its jobs stay
    /// queryable. The host is free for the next purchase.
    pub fn release_server(&self, server_id: &str) -> Result<()> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        drop_server(&tx, server_id)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a host that is gone for good (its agent silent): the
    /// server on it is released as by [`Store::release_server`], its
    /// unfinished jobs fail, and the host leaves the fleet. A host whose
    /// agent answers is refused.
    pub fn forget_node(&self, node_id: &str) -> Result<Forgotten> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let alive: Option<i64> = tx
            .query_row(
                "SELECT alive FROM nodes WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        match alive {
            None => return Err(StoreError::NodeNotFound(node_id.to_string())),
            Some(a) if a != 0 => return Err(StoreError::NodeAlive(node_id.to_string())),
            Some(_) => {}
        }
        let server: Option<String> = tx
            .query_row(
                "SELECT server_id FROM servers WHERE node_id = ?1",
                [node_id],
                |r| r.get(0),
            )
            .optional()?;
        let failed_jobs = fail_node_jobs(
            &tx,
            node_id,
            "the host of the server was taken out of the fleet",
        )?;
        if let Some(server) = &server {
            drop_server(&tx, server)?;
        }
        tx.execute("DELETE FROM nodes WHERE node_id = ?1", [node_id])?;
        tx.commit()?;
        Ok(Forgotten {
            server_id: server,
            failed_jobs,
        })
    }

    /// Switches a server to a free host of its model, all at once: the
    /// server row moves there as being created (1), its phones are
    /// replaced by `sw.phones`, the job that makes it there is recorded,
    /// the host it leaves keeps it as `releasing_server` (not free) until
    /// `sw.release_job` has run there, and the unfinished jobs on that host
    /// fail (those of its old phones, and a migration's restore into one).
    /// `Ok(None)` when no host is free, or the server is no longer running
    /// or abnormal (being made, switched or deleted).
    pub fn switch_server(&self, sw: &Switch) -> Result<Option<Switched>> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        // Checked again here, against a deletion or switch that raced.
        let old: Option<(String, String, String)> = tx
            .query_row(
                "SELECT node_id, server_model_name, project_id FROM servers s
                 WHERE server_id = ?1 AND status IN (2, 5)
                   AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.server_id = s.server_id
                       AND j.status = 1 AND json_extract(j.request, '$.kind') = 'delete_server')",
                [&sw.server_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((old_node, model, project_id)) = old else {
            return Ok(None);
        };
        let new_node: Option<String> = tx
            .query_row(
                &format!(
                    "SELECT n.node_id FROM nodes n WHERE n.server_model = ?1 AND {FREE_HOST}
                     ORDER BY n.node_id LIMIT 1"
                ),
                [&model],
                |r| r.get(0),
            )
            .optional()?;
        let Some(new_node) = new_node else {
            return Ok(None);
        };
        let now = now_string();
        // A host holds one server: every job still unfinished there is
        // one of its phones' (or a restore into one of them).
        let failed_jobs =
            fail_node_jobs(&tx, &old_node, "the server was switched to another host")?;
        tx.execute(
            "UPDATE nodes SET releasing_server = ?2, release_job = ?3 WHERE node_id = ?1",
            params![old_node, sw.server_id, sw.release_job],
        )?;
        tx.execute(
            "UPDATE servers SET node_id = ?2, status = 1, create_dispatched = 1,
                phone_model_name = ?3, image_id = ?4, keypair_name = ?5, ports = ?6,
                encoder_status = 0, encoder_access_infos = '[]', update_time = ?7
             WHERE server_id = ?1",
            params![
                sw.server_id,
                new_node,
                sw.phone_model_name,
                sw.image_id,
                sw.keypair_name,
                sw.ports,
                now
            ],
        )?;
        tx.execute("DELETE FROM phones WHERE server_id = ?1", [&sw.server_id])?;
        insert_new_phones(
            &tx,
            &NewPhones {
                project_id: &project_id,
                server_id: &sw.server_id,
                phone_model_name: &sw.phone_model_name,
                image_id: &sw.image_id,
                property: &sw.property,
                phones: &sw.phones,
                now: &now,
                seq: now_seq(),
            },
        )?;
        let job = Job {
            node_id: new_node,
            ..sw.job.clone()
        };
        insert_jobs_in(&tx, std::slice::from_ref(&job))?;
        tx.commit()?;
        drop(c);
        Ok(self.server_by_id(&sw.server_id)?.map(|server| Switched {
            server,
            job,
            failed_jobs,
        }))
    }

    /// Hosts whose agent answers and that still hold a server switched
    /// away from them (`releasing_server`), each with its release job id.
    pub fn releasing_hosts(&self) -> Result<Vec<(Node, String)>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {NODE_COLS}, n.release_job FROM nodes n
               LEFT JOIN servers s ON s.node_id = n.node_id
             WHERE n.alive = 1 AND n.releasing_server IS NOT NULL AND n.release_job IS NOT NULL"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], |r| Ok((node_row(r)?, r.get(12)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a share file system; false when its id is taken.
    pub fn insert_share_fs(&self, fs: &ShareFilesystem) -> Result<bool> {
        let n = self.db()?.execute(
            "INSERT OR IGNORE INTO share_filesystems (fs_id, project_id, type, source, create_time)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![fs.fs_id, fs.project_id, fs.kind, fs.source, fs.create_time],
        )?;
        Ok(n == 1)
    }

    /// Share file systems, of one project or all.
    pub fn share_filesystems(&self, project_id: Option<&str>) -> Result<Vec<ShareFilesystem>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(
            "SELECT fs_id, project_id, type, source, create_time FROM share_filesystems
             WHERE ?1 IS NULL OR project_id = ?1 ORDER BY fs_id",
        )?;
        let rows = st.query_map([project_id], |r| {
            Ok(ShareFilesystem {
                fs_id: r.get(0)?,
                project_id: r.get(1)?,
                kind: r.get(2)?,
                source: r.get(3)?,
                create_time: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a share file system attached to a server (`Some(source)`)
    /// or detached from it (`None`).
    pub fn set_server_share_fs(
        &self,
        server_id: &str,
        fs_id: &str,
        source: Option<&str>,
    ) -> Result<()> {
        let c = self.db()?;
        match source {
            Some(source) => c.execute(
                "INSERT INTO server_share_filesystems (server_id, fs_id, source) VALUES (?1, ?2, ?3)
                 ON CONFLICT(server_id, fs_id) DO UPDATE SET source = excluded.source",
                params![server_id, fs_id, source],
            )?,
            None => c.execute(
                "DELETE FROM server_share_filesystems WHERE server_id = ?1 AND fs_id = ?2",
                params![server_id, fs_id],
            )?,
        };
        Ok(())
    }

    /// The share file systems attached to a server: (id, host directory).
    pub fn server_share_filesystems(&self, server_id: &str) -> Result<Vec<(String, String)>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(
            "SELECT fs_id, source FROM server_share_filesystems WHERE server_id = ?1 ORDER BY fs_id",
        )?;
        let rows = st.query_map([server_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Keeps a host out of sale (`true`) or puts it back on sale; a server
    /// on it stays. False when there is no such host.
    pub fn cordon(&self, node_id: &str, cordoned: bool) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE nodes SET cordoned = ?2 WHERE node_id = ?1",
            params![node_id, cordoned as i64],
        )?;
        Ok(n == 1)
    }

    /// Takes `node` out of sale to release `server_id`, whose phones its
    /// agent reports though the fleet places no such server on it (a host
    /// forgotten and back, or away when its server was switched or
    /// deleted): `release_job` is then sent to it as for a switch. False
    /// (nothing done) when the server is the node's, the node already
    /// releases one, or the server's deletion succeeded on the node (a
    /// heartbeat taken while it ran).
    pub fn release_orphan(
        &self,
        node_id: &str,
        server_id: &str,
        release_job: &str,
    ) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE nodes SET releasing_server = ?2, release_job = ?3
             WHERE node_id = ?1 AND releasing_server IS NULL
               AND NOT EXISTS (SELECT 1 FROM servers WHERE server_id = ?2 AND node_id = ?1)
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.server_id = ?2 AND j.node_id = ?1
                   AND j.status = 2 AND json_extract(j.request, '$.kind') = 'delete_server')",
            params![node_id, server_id, release_job],
        )?;
        Ok(n == 1)
    }

    /// Frees a host whose agent deleted the phones of the server switched
    /// away from it (only while `release_job` is still its job).
    pub fn host_released(&self, node_id: &str, release_job: &str) -> Result<()> {
        self.db()?.execute(
            "UPDATE nodes SET releasing_server = NULL, release_job = NULL
             WHERE node_id = ?1 AND release_job = ?2",
            params![node_id, release_job],
        )?;
        Ok(())
    }

    /// Marks the phones of a server that are still being created as failed
    /// (-8): the job that was to make them ended without them.
    pub fn fail_unmade_phones(&self, server_id: &str) -> Result<usize> {
        Ok(self.db()?.execute(
            "UPDATE phones SET status = -8, update_time = ?2
             WHERE server_id = ?1 AND status IN (0, 1)",
            params![server_id, now_string()],
        )?)
    }

    /// `(key, count)` rows of a `SELECT key, COUNT(*) ... GROUP BY` query.
    pub fn counts(&self, sql: &str) -> Result<Vec<(String, i64)>> {
        let c = self.db()?;
        let mut st = c.prepare_cached(sql)?;
        let rows = st.query_map([], |r| {
            let key: rusqlite::types::Value = r.get(0)?;
            let key = match key {
                rusqlite::types::Value::Integer(i) => i.to_string(),
                rusqlite::types::Value::Text(t) => t,
                rusqlite::types::Value::Real(f) => f.to_string(),
                _ => String::new(),
            };
            Ok((key, r.get(1)?))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks a server abnormal (2), as after a deletion that failed.
    pub fn set_server_abnormal(&self, server_id: &str) -> Result<()> {
        self.db()?.execute(
            "UPDATE servers SET status = 2, update_time = ?2 WHERE server_id = ?1",
            params![server_id, now_string()],
        )?;
        Ok(())
    }

    // ---- phones --------------------------------------------------------

    /// A project's phone.
    pub fn phone(&self, project_id: &str, phone_id: &str) -> Result<Option<Phone>> {
        let c = self.db()?;
        let sql =
            format!("SELECT {PHONE_COLS} FROM phones WHERE project_id = ?1 AND phone_id = ?2");
        let mut st = c.prepare_cached(&sql)?;
        Ok(st
            .query_row(params![project_id, phone_id], phone_row)
            .optional()?)
    }

    /// A server's phones by slot.
    pub fn server_phones(&self, server_id: &str) -> Result<Vec<Phone>> {
        let c = self.db()?;
        let sql = format!("SELECT {PHONE_COLS} FROM phones WHERE server_id = ?1 ORDER BY slot");
        let mut st = c.prepare_cached(&sql)?;
        let rows = st.query_map([server_id], phone_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A page of a project's phones, newest first. A page at least
    /// [`DEEP_OFFSET`] deep starts from the listing's remembered positions
    /// (one index seek) instead of stepping over `offset` rows.
    pub fn list_phones(
        &self,
        project_id: &str,
        f: &PhoneFilter,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<Phone>> {
        let c = self.db()?;
        let (filter, mut values) = phone_filter(project_id, f);
        let sql = if offset < DEEP_OFFSET {
            values.extend([Value::from(limit), Value::from(offset)]);
            format!(
                "SELECT {PHONE_COLS} FROM phones WHERE {filter}
                 ORDER BY seq DESC, rowid LIMIT ?{} OFFSET ?{}",
                values.len() - 1,
                values.len()
            )
        } else {
            let positions = self.list_positions(&c, project_id, f, &filter, &values)?;
            let Some(&(seq, rowid)) = positions.get(offset as usize) else {
                return Ok(Vec::new());
            };
            values.extend([Value::from(seq), Value::from(rowid), Value::from(limit)]);
            let n = values.len();
            format!(
                "SELECT {PHONE_COLS} FROM phones WHERE {filter}
                   AND seq <= ?{s} AND NOT (seq = ?{s} AND rowid < ?{r})
                 ORDER BY seq DESC, rowid LIMIT ?{n}",
                s = n - 2,
                r = n - 1
            )
        };
        let mut st = c.prepare_cached(&sql)?;
        let rows = st.query_map(params_from_iter(values), phone_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// How many phones a listing has in all (the positions the deep pages
    /// use, remembered the same way).
    pub fn count_phones(&self, project_id: &str, f: &PhoneFilter) -> Result<usize> {
        let c = self.db()?;
        let (filter, values) = phone_filter(project_id, f);
        Ok(self
            .list_positions(&c, project_id, f, &filter, &values)?
            .len())
    }

    /// `(seq, rowid)` of every phone of a listing (`filter` and its `values`
    /// from [`phone_filter`]) in its order, remembered
    /// while the project's revision counters (kept by triggers, so every
    /// writer of the database moves them) say the listing is unchanged.
    fn list_positions(
        &self,
        c: &Connection,
        project_id: &str,
        f: &PhoneFilter,
        filter: &str,
        values: &[Value],
    ) -> Result<Arc<Vec<(i64, i64)>>> {
        let (members, attrs): (i64, i64) = c
            .prepare_cached("SELECT members, attrs FROM phone_list_rev WHERE project_id = ?1")?
            .query_row([project_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((0, 0));
        // An unfiltered listing does not change with a phone's attributes.
        let rev = if f.is_empty() {
            (members, 0)
        } else {
            (members, attrs)
        };
        let key = (project_id.to_string(), f.clone());
        let mut cache = self.positions.lock().map_err(|_| StoreError::Poisoned)?;
        if let Some(p) = cache.get(&key, rev) {
            return Ok(p);
        }
        let mut st = c.prepare_cached(&format!(
            "SELECT seq, rowid FROM phones WHERE {filter} ORDER BY seq DESC, rowid"
        ))?;
        let rows = st.query_map(params_from_iter(values), |r| Ok((r.get(0)?, r.get(1)?)))?;
        let positions = Arc::new(rows.collect::<rusqlite::Result<Vec<_>>>()?);
        cache.put(key, rev, positions.clone());
        Ok(positions)
    }

    /// Sets a phone's status.
    pub fn set_phone_status(&self, phone_id: &str, status: i32) -> Result<()> {
        self.db()?.execute(
            "UPDATE phones SET status = ?2, update_time = ?3 WHERE phone_id = ?1",
            params![phone_id, status, now_string()],
        )?;
        Ok(())
    }

    /// Renames a phone.
    pub fn rename_phone(&self, project_id: &str, phone_id: &str, name: &str) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE phones SET phone_name = ?3, update_time = ?4 WHERE project_id = ?1 AND phone_id = ?2",
            params![project_id, phone_id, name, now_string()],
        )?;
        Ok(n > 0)
    }

    /// Records the properties a phone's agent applied: merged into the
    /// phone's own (an update, a restart) or in their place (a reset, a
    /// migration's restore). Values are stored as strings, as given.
    pub fn apply_phone_property(
        &self,
        phone_id: &str,
        property: &std::collections::BTreeMap<String, String>,
        replace: bool,
    ) -> Result<()> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let current: Option<String> = tx
            .query_row(
                "SELECT property FROM phones WHERE phone_id = ?1",
                [phone_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(current) = current else {
            return Ok(());
        };
        let mut merged: serde_json::Map<String, serde_json::Value> = if replace {
            serde_json::Map::new()
        } else {
            serde_json::from_str(&current).unwrap_or_default()
        };
        for (k, v) in property {
            merged.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        tx.execute(
            "UPDATE phones SET property = ?2, update_time = ?3 WHERE phone_id = ?1",
            params![
                phone_id,
                serde_json::Value::Object(merged).to_string(),
                now_string()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Inserts phones directly (fleet import and benchmarks).
    pub fn insert_phones(&self, phones: &[Phone]) -> Result<()> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare(&format!(
                "INSERT INTO phones ({PHONE_COLS}, seq) VALUES
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ))?;
            let base = now_seq();
            for (i, p) in phones.iter().enumerate() {
                st.execute(params![
                    p.phone_id,
                    p.project_id,
                    p.server_id,
                    p.phone_name,
                    p.phone_model_name,
                    p.image_id,
                    p.status,
                    p.phone_type,
                    p.slot,
                    p.property,
                    p.access_infos,
                    p.traffic_type,
                    p.create_time,
                    p.update_time,
                    base + i as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // ---- jobs ----------------------------------------------------------

    /// Persists new jobs in one transaction. A job whose server left its
    /// host, or whose phone left its server, or whose server's deletion
    /// began, since the job was made (a switch or deletion in the same
    /// instant) is stored failed with the reason, never sent. Returns the
    /// ids of those.
    pub fn insert_jobs(&self, jobs: &[Job]) -> Result<Vec<String>> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let mut rows = Vec::with_capacity(jobs.len());
        let mut stale = Vec::new();
        for j in jobs {
            let mut j = j.clone();
            if j.status == 1 {
                if let Some((code, msg)) = moved_since(&tx, &j)? {
                    j.status = -1;
                    j.error_code = Some(code.to_string());
                    j.error_msg = Some(msg);
                    j.end_time = Some(now_string());
                    stale.push(j.job_id.clone());
                }
            }
            rows.push(j);
        }
        insert_jobs_in(&tx, &rows)?;
        tx.commit()?;
        Ok(stale)
    }

    /// A project's job.
    pub fn job(&self, project_id: &str, job_id: &str) -> Result<Option<Job>> {
        let c = self.db()?;
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE project_id = ?1 AND job_id = ?2");
        Ok(c.query_row(&sql, params![project_id, job_id], job_row)
            .optional()?)
    }

    /// A job by id, any project (agents' reports).
    pub fn job_any(&self, job_id: &str) -> Result<Option<Job>> {
        let c = self.db()?;
        let sql = format!("SELECT {JOB_COLS} FROM jobs WHERE job_id = ?1");
        Ok(c.query_row(&sql, [job_id], job_row).optional()?)
    }

    /// A project's jobs of the given request ids, in creation order.
    pub fn jobs_by_requests(
        &self,
        project_id: &str,
        request_ids: &[String],
        offset: u32,
        limit: u32,
    ) -> Result<Vec<Job>> {
        let c = self.db()?;
        let marks: Vec<String> = (0..request_ids.len())
            .map(|i| format!("?{}", i + 4))
            .collect();
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE project_id = ?1 AND request_id IN ({})
             ORDER BY seq LIMIT ?2 OFFSET ?3",
            marks.join(", ")
        );
        let mut st = c.prepare(&sql)?;
        let mut args: Vec<&dyn rusqlite::ToSql> = vec![&project_id, &limit, &offset];
        for r in request_ids {
            args.push(r);
        }
        let rows = st.query_map(args.as_slice(), job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Running jobs not yet accepted by their agent, oldest first.
    pub fn undispatched_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let c = self.db()?;
        // A server's deletion waits until every earlier job touching the
        // server (its phones', its own, a migration into it) has ended.
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs j WHERE status = 1 AND dispatched = 0
               AND NOT (json_extract(request, '$.kind') = 'delete_server' AND EXISTS (
                 SELECT 1 FROM jobs o WHERE o.status = 1 AND o.seq < j.seq
                   AND o.job_id != j.job_id
                   AND (o.server_id = j.server_id OR o.node_id = j.node_id
                        OR instr(o.request, '\"server_id\":\"' || j.server_id || '\"') > 0)))
             ORDER BY seq LIMIT ?1"
        );
        let mut st = c.prepare_cached(&sql)?;
        let rows = st.query_map([limit], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Running jobs already at their agent (to poll after a restart).
    pub fn dispatched_running_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let c = self.db()?;
        let sql = format!(
            "SELECT {JOB_COLS} FROM jobs WHERE status = 1 AND dispatched = 1 ORDER BY seq LIMIT ?1"
        );
        let mut st = c.prepare_cached(&sql)?;
        let rows = st.query_map([limit], job_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records a dispatch attempt's outcome; the job's attempts so far.
    pub fn mark_dispatched(&self, job_id: &str, ok: bool) -> Result<u32> {
        Ok(self
            .db()?
            .prepare_cached(MARK_DISPATCHED)?
            .query_row(params![job_id, ok as i64], |r| r.get(0))?)
    }

    /// [`Store::mark_dispatched`] for many jobs in one transaction; the
    /// attempts of each, in order.
    pub fn mark_dispatched_many(&self, outcomes: &[(&str, bool)]) -> Result<Vec<u32>> {
        let mut c = self.db()?;
        let tx = c.transaction()?;
        let mut attempts = Vec::with_capacity(outcomes.len());
        {
            let mut up = tx.prepare_cached(MARK_DISPATCHED)?;
            for (job_id, ok) in outcomes {
                let n: Option<u32> = up
                    .query_row(params![job_id, *ok as i64], |r| r.get(0))
                    .optional()?;
                attempts.push(n.unwrap_or(0));
            }
        }
        tx.commit()?;
        Ok(attempts)
    }

    /// Finishes or updates a job. Finished jobs are never reopened.
    pub fn update_job(
        &self,
        job_id: &str,
        status: i32,
        error_code: Option<&str>,
        error_msg: Option<&str>,
        execute_msg: Option<&str>,
    ) -> Result<bool> {
        let end = (status != 1).then(now_string);
        let n = self.db()?.execute(
            "UPDATE jobs SET status = ?2, error_code = ?3, error_msg = ?4, execute_msg = ?5,
               end_time = ?6 WHERE job_id = ?1 AND status = 1",
            params![job_id, status, error_code, error_msg, execute_msg, end],
        )?;
        Ok(n > 0)
    }

    /// Moves a running job to its next phase: another host and request, to
    /// be dispatched again.
    pub fn retarget_job(&self, job_id: &str, node_id: &str, request: &str) -> Result<bool> {
        let n = self.db()?.execute(
            "UPDATE jobs SET node_id = ?2, request = ?3, dispatched = 0, attempts = 0
             WHERE job_id = ?1 AND status = 1",
            params![job_id, node_id, request],
        )?;
        Ok(n > 0)
    }

    // ---- bandwidths, keypairs, rate limits -----------------------------

    /// Inserts a bandwidth.
    pub fn insert_bandwidth(&self, b: &Bandwidth) -> Result<()> {
        let c = self.db()?;
        insert_bandwidth_in(&c, b)
    }

    /// A project's bandwidths, newest first.
    pub fn list_bandwidths(
        &self,
        project_id: &str,
        offset: u32,
        limit: u32,
    ) -> Result<Vec<Bandwidth>> {
        let c = self.db()?;
        let mut st = c.prepare(&format!(
            "SELECT {BANDWIDTH_COLS} FROM bandwidths
             WHERE project_id = ?1 ORDER BY seq DESC LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = st.query_map(params![project_id, limit, offset], bandwidth_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One bandwidth of a project.
    pub fn bandwidth(&self, project_id: &str, id: &str) -> Result<Option<Bandwidth>> {
        Ok(self
            .db()?
            .query_row(
                &format!(
                    "SELECT {BANDWIDTH_COLS} FROM bandwidths
                     WHERE project_id = ?1 AND band_width_id = ?2"
                ),
                params![project_id, id],
                bandwidth_row,
            )
            .optional()?)
    }

    /// Sets a bandwidth's size.
    pub fn set_bandwidth_size(&self, project_id: &str, id: &str, size: u32) -> Result<()> {
        self.db()?.execute(
            "UPDATE bandwidths SET band_width_size = ?3, update_time = ?4 WHERE project_id = ?1 AND band_width_id = ?2",
            params![project_id, id, size, now_string()],
        )?;
        Ok(())
    }

    /// Stores a project's keypair.
    pub fn put_keypair(&self, project_id: &str, name: &str, public_key: &str) -> Result<()> {
        self.db()?.execute(
            "INSERT OR REPLACE INTO keypairs (project_id, keypair_name, public_key) VALUES (?1, ?2, ?3)",
            params![project_id, name, public_key],
        )?;
        Ok(())
    }

    /// A project's keypair public key.
    pub fn keypair(&self, project_id: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .db()?
            .query_row(
                "SELECT public_key FROM keypairs WHERE project_id = ?1 AND keypair_name = ?2",
                params![project_id, name],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every project's keypairs: (project id, keypair name), sorted.
    pub fn keypairs(&self) -> Result<Vec<(String, String)>> {
        let c = self.db()?;
        let mut st = c.prepare(
            "SELECT project_id, keypair_name FROM keypairs ORDER BY project_id, keypair_name",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Counts a synchronous shell call in a one-minute window; false when the
    /// project already made `max` calls in the last 60 s.
    pub fn take_sync_shell_slot(&self, project_id: &str, max: u32) -> Result<bool> {
        let c = self.db()?;
        let now = now_secs();
        c.execute("DELETE FROM sync_shell_calls WHERE at <= ?1", [now - 60])?;
        let n: u32 = c.query_row(
            "SELECT COUNT(*) FROM sync_shell_calls WHERE project_id = ?1",
            [project_id],
            |r| r.get(0),
        )?;
        if n >= max {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO sync_shell_calls (project_id, at) VALUES (?1, ?2)",
            params![project_id, now],
        )?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn utc_times_parse_back_and_malformed_ones_do_not() {
        for secs in [0, 951_782_400, 1_764_892_800, 4_102_444_799] {
            assert_eq!(parse_utc(&utc_string(secs)), Some(secs), "{secs}");
        }
        assert_eq!(parse_utc("2026-12-05T08:00:00Z"), Some(1_796_457_600));
        for bad in [
            "",
            "2026-12-05 08:00:00Z",
            "2026-13-05T08:00:00Z",
            "2026-02-30T08:00:00Z",
            "2026-12-05T24:00:00Z",
            "2026-12-05T08:00:00+00:00",
            "+026-12-05T08:00:00Z",
        ] {
            assert_eq!(parse_utc(bad), None, "{bad}");
        }
    }
    use super::*;

    #[test]
    fn two_connections_writing_at_once_both_get_through() {
        // Two handles on one file, as `cph serve` and `cph admin` are;
        // each inserts jobs, a transaction that reads before it writes.
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Store::open_dir(dir.path()).expect("open");
        let b = Store::open_dir(dir.path()).expect("open again");
        let p = a.create_project("acme").expect("project");
        let job = |id: String| {
            let req = cph_agent::protocol::JobRequest {
                job_id: id.clone(),
                request_id: id,
                server_id: "no-such-server".into(),
                phone_id: None,
                kind: cph_agent::protocol::JobKind::StartPhone,
            };
            Job::running(&req, &p.project_id, "n", &now_string()).expect("job")
        };
        const EACH: usize = 300;
        std::thread::scope(|scope| {
            for (name, s) in [("a", &a), ("b", &b)] {
                let job = &job;
                scope.spawn(move || {
                    for i in 0..EACH {
                        s.insert_jobs(&[job(format!("{name}-{i}"))])
                            .unwrap_or_else(|e| panic!("{name}-{i}: {e:?}"));
                    }
                });
            }
        });
        let n: i64 = a
            .db()
            .expect("db")
            .query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 2 * EACH as i64);
    }

    #[test]
    fn a_backup_is_a_whole_store_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        let p = s.create_project("acme").expect("project");
        let (ak, _) = s.create_credential(&p.project_id).expect("credential");
        let copy = dir.path().join("copy.db");
        s.backup(&copy).expect("backup");
        // Written to again, the store goes on; the copy keeps what it had.
        s.create_project("later").expect("project");
        assert!(s.backup(&copy).is_err(), "an existing file is kept");
        let b = Store::open(&copy).expect("open the copy");
        assert_eq!(
            b.schema_version().expect("version"),
            s.schema_version().expect("version")
        );
        assert_eq!(
            b.project("acme").expect("q").map(|x| x.project_id),
            Some(p.project_id)
        );
        assert!(b.credential(&ak).expect("q").is_some());
        assert!(b.project("later").expect("q").is_none());
    }

    #[test]
    fn utc_string_formats_known_instants() {
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(1_556_262_006), "2019-04-26T07:00:06Z");
    }

    #[test]
    fn migrations_are_versioned_and_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        assert_eq!(
            s.schema_version().expect("v"),
            migrations::MIGRATIONS.len() as i64
        );
        let p = s.create_project("p1").expect("project");
        drop(s);
        let s = Store::open_dir(dir.path()).expect("reopen");
        assert_eq!(s.project("p1").expect("q").expect("kept"), p);
    }

    #[test]
    fn users_check_passwords() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        let p = s.create_project("p").expect("project");
        s.create_user("alice", "pw", &p.project_id).expect("user");
        let stored: String = s
            .db()
            .expect("db")
            .query_row(
                "SELECT password_hash FROM users WHERE name = 'alice'",
                [],
                |r| r.get(0),
            )
            .expect("row");
        assert!(stored.starts_with("pbkdf2-sha256$100000$"), "{stored}");
        assert_eq!(
            s.check_user("alice", "pw").expect("q"),
            Some(p.project_id.clone())
        );
        assert_eq!(s.check_user("alice", "bad").expect("q"), None);
        assert_eq!(s.check_user("bob", "pw").expect("q"), None);
    }

    /// The store holds a token's hash: what it holds does not open the API.
    #[test]
    fn tokens_are_kept_as_their_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        let p = s.create_project("p").expect("project");
        s.put_token("tok-1", "alice", &p.project_id, now_secs() + 60)
            .expect("put");
        let kept: String = s
            .db()
            .expect("db")
            .query_row("SELECT token FROM tokens", [], |r| r.get(0))
            .expect("row");
        assert_eq!(kept, crate::auth::token::hash_token("tok-1"));
        assert_eq!(s.token_project("tok-1").expect("q"), Some(p.project_id));
        assert_eq!(s.token_project(&kept).expect("q"), None);
        assert_eq!(s.token_project("tok-2").expect("q"), None);
    }

    /// A user of a store made before PBKDF2 logs in with the password it
    /// had, and its hash is upgraded then (not before: a wrong password
    /// changes nothing).
    #[test]
    fn former_password_hashes_are_accepted_and_upgraded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        let p = s.create_project("p").expect("project");
        let stored = |s: &Store| -> String {
            s.db()
                .expect("db")
                .query_row(
                    "SELECT password_hash FROM users WHERE name = 'old'",
                    [],
                    |r| r.get(0),
                )
                .expect("row")
        };
        let legacy = legacy_password_hash("salt1", "pw");
        s.db()
            .expect("db")
            .execute(
                "INSERT INTO users (name, password_hash, salt, project_id) VALUES ('old', ?1, 'salt1', ?2)",
                params![legacy, p.project_id],
            )
            .expect("insert");
        assert_eq!(s.check_user("old", "bad").expect("q"), None);
        assert_eq!(stored(&s), legacy);
        assert_eq!(
            s.check_user("old", "pw").expect("q"),
            Some(p.project_id.clone())
        );
        let upgraded = stored(&s);
        assert!(upgraded.starts_with("pbkdf2-sha256$"), "{upgraded}");
        assert_eq!(
            s.check_user("old", "pw").expect("q"),
            Some(p.project_id.clone())
        );
        assert_eq!(s.check_user("old", "bad").expect("q"), None);
    }

    /// Jobs are sent in the order they were made even when the host's
    /// clock went back in between.
    #[test]
    fn jobs_keep_their_order_when_the_clock_goes_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        let job = |id: &str| {
            let req = cph_agent::protocol::JobRequest {
                job_id: id.into(),
                request_id: "r".into(),
                server_id: "s".into(),
                phone_id: Some("ph".into()),
                kind: cph_agent::protocol::JobKind::Shell {
                    command: "ls".into(),
                },
            };
            Job::running(&req, "p", "n", &now_string()).expect("job")
        };
        let insert = |id: &str| {
            let mut c = s.db().expect("db");
            let tx = c.transaction().expect("tx");
            insert_jobs_in(&tx, &[job(id)]).expect("insert");
            tx.commit().expect("commit");
        };
        insert("first");
        // As if made an hour ahead of the clock now.
        s.db()
            .expect("db")
            .execute("UPDATE jobs SET seq = seq + 3600000000", [])
            .expect("shift");
        insert("second");
        let order: Vec<String> = s
            .undispatched_jobs(10)
            .expect("pending")
            .into_iter()
            .map(|j| j.job_id)
            .collect();
        assert_eq!(order, ["first", "second"]);
    }

    fn test_phone(project: &str, i: usize) -> Phone {
        Phone {
            phone_id: format!("ph-{project}-{i:05}"),
            project_id: project.into(),
            server_id: format!("srv-{}", i % 3),
            phone_name: format!("phone-{i:05}"),
            phone_model_name: "m".into(),
            image_id: "img".into(),
            status: 2,
            phone_type: 0,
            slot: i as u32,
            property: "{}".into(),
            access_infos: "[]".into(),
            traffic_type: "direct".into(),
            create_time: now_string(),
            update_time: now_string(),
        }
    }

    /// Every page of `f` (shallow and deep, odd offsets included) against
    /// the whole listing read in one query.
    fn check_pages(s: &Store, project: &str, f: &PhoneFilter) {
        let all = s
            .list_phones(project, f, 0, u32::MAX)
            .expect("whole listing");
        let ids: Vec<&str> = all.iter().map(|p| p.phone_id.as_str()).collect();
        let mut offsets: Vec<usize> = (0..=ids.len() + 100).step_by(97).collect();
        offsets.extend([999, 1000, 1001, ids.len().saturating_sub(1), ids.len()]);
        for off in offsets {
            let page = s.list_phones(project, f, off as u32, 50).expect("page");
            let got: Vec<&str> = page.iter().map(|p| p.phone_id.as_str()).collect();
            let want: Vec<&str> = ids.iter().skip(off).take(50).copied().collect();
            assert_eq!(got, want, "offset {off} of {f:?}");
        }
    }

    #[test]
    fn deep_phone_pages_follow_every_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open_dir(dir.path()).expect("open");
        // Phones without servers or projects: only the listing is tested.
        s.db()
            .expect("db")
            .execute_batch("PRAGMA foreign_keys = OFF")
            .expect("pragma");
        let a: Vec<Phone> = (0..2500).map(|i| test_phone("pa", i)).collect();
        let b: Vec<Phone> = (0..1200).map(|i| test_phone("pb", i)).collect();
        s.insert_phones(&a).expect("insert");
        s.insert_phones(&b).expect("insert");
        // Equal seqs are ordered by insertion.
        s.db()
            .expect("db")
            .execute(
                "UPDATE phones SET seq = 7 WHERE project_id = 'pa' AND slot BETWEEN 1000 AND 1100",
                [],
            )
            .expect("ties");
        let filters = [
            PhoneFilter::default(),
            PhoneFilter {
                server_id: Some("srv-1".into()),
                ..Default::default()
            },
            PhoneFilter {
                status: Some(2),
                phone_name: Some("phone-0".into()),
                ..Default::default()
            },
        ];
        for f in &filters {
            check_pages(&s, "pa", f);
        }
        check_pages(&s, "pb", &PhoneFilter::default());
        // Changes through another connection to the same database.
        let other = Store::open_dir(dir.path()).expect("second handle");
        for i in (0..2500).step_by(3) {
            other
                .set_phone_status(&format!("ph-pa-{i:05}"), -7)
                .expect("status");
        }
        other
            .db()
            .expect("db")
            .execute(
                "DELETE FROM phones WHERE project_id = 'pa' AND slot % 5 = 0",
                [],
            )
            .expect("delete");
        other
            .db()
            .expect("db")
            .execute_batch("PRAGMA foreign_keys = OFF")
            .expect("pragma");
        other
            .insert_phones(
                &(2500..2700)
                    .map(|i| test_phone("pa", i))
                    .collect::<Vec<_>>(),
            )
            .expect("insert");
        for f in &filters {
            check_pages(&s, "pa", f);
        }
        check_pages(
            &s,
            "pa",
            &PhoneFilter {
                status: Some(-7),
                ..Default::default()
            },
        );
        let deep = s
            .list_phones("pa", &PhoneFilter::default(), 1500, 10)
            .expect("deep");
        assert_eq!(deep.len(), 10);
        assert!(deep.iter().all(|p| p.project_id == "pa"));
    }

    #[test]
    fn like_pattern_escapes_wildcards() {
        assert_eq!(like_pattern("a_b%"), "%a\\_b\\%%");
    }
}
