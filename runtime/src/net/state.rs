//! The persisted network state: which phone has which slot, address, port
//! mappings, bandwidth limit and traffic mode. It is the single source from
//! which rules and classes are rendered, and the access info is read. The
//! access-port allocator lives here: it is pure, takes the ports already in
//! use on the host as input, and keeps a cursor so freed ports are not handed
//! out again at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{NetConfig, NetError};

/// A port a phone serves, as requested. `system` ports are the platform's
/// own (`adb`, `vnc`) and skip the user-port rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRequest {
    pub name: String,
    pub listen_port: u16,
    pub internet_accessible: bool,
    #[serde(default)]
    pub system: bool,
}

/// One applied mapping: host `access_port` to the phone's `listen_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub name: String,
    pub listen_port: u16,
    pub access_port: u16,
    pub internet_accessible: bool,
    #[serde(default)]
    pub system: bool,
}

/// A phone's download limit (`com.cph.bandwidth_limit`, kbit/s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BandwidthLimit {
    /// `-1`: up to the server's shared bandwidth.
    Unlimited,
    Kbit(u32),
}

/// Where a phone's default route points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrafficType {
    /// Through the host bridge.
    Direct,
    /// Through the encoding container's address.
    Routing(Ipv4Addr),
}

/// One phone's network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneNet {
    pub phone_id: String,
    /// Slot: picks the address, veth name and tc class.
    pub index: u32,
    pub ip: Ipv4Addr,
    pub host_if: String,
    /// The phone's network namespace (`/proc/<pid>/ns/net`, `/run/netns/x`).
    pub netns: PathBuf,
    pub ports: Vec<PortMapping>,
    pub bandwidth: BandwidthLimit,
    pub traffic: TrafficType,
}

/// What the API shows for one mapped port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessInfo {
    pub phone_ip: String,
    pub server_ip: String,
    /// Empty when the port is not internet accessible.
    pub public_ip: String,
    pub listen_port: u16,
    pub access_port: u16,
    #[serde(rename = "type")]
    pub kind: String,
}

/// Everything the agent's networking remembers across restarts.
///
/// On disk it is split so that one phone's change writes one small file:
/// the host file (`network.json`: shared bandwidth, port cursor) and one
/// file per phone in the sibling directory `network.phones/`. Each phone
/// file also carries the port cursor after its last allocation and a
/// sequence number; on load the newest record's cursor wins. A single-file
/// state of an earlier layout (phones inside the host file) is still read,
/// and the next full save splits it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetState {
    pub phones: BTreeMap<String, PhoneNet>,
    /// Server-wide shared bandwidth, Mbit/s.
    pub shared_bandwidth_mbit: u32,
    /// Next access port to try.
    pub port_cursor: u16,
    /// Sequence number of the last record written.
    pub seq: u64,
}

/// The host file.
#[derive(Serialize, Deserialize)]
struct HostRecord {
    shared_bandwidth_mbit: u32,
    port_cursor: u16,
    #[serde(default)]
    seq: u64,
    /// Only in the earlier single-file layout.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    phones: BTreeMap<String, PhoneNet>,
}

/// One phone's file.
#[derive(Serialize, Deserialize)]
struct PhoneRecord {
    phone: PhoneNet,
    port_cursor: u16,
    seq: u64,
}

/// The directory of per-phone files next to the host file `path`.
pub fn phones_dir(path: &Path) -> PathBuf {
    path.with_extension("phones")
}

/// A phone's file name: the id itself when it is a plain name, otherwise
/// its bytes in hex (ids come from the control plane; never a path).
fn phone_file(dir: &Path, phone_id: &str) -> PathBuf {
    let plain = !phone_id.is_empty()
        && !phone_id.starts_with('.')
        && phone_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let name = if plain {
        format!("{phone_id}.json")
    } else {
        let hex: String = phone_id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}.json")
    };
    dir.join(name)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> NetError + '_ {
    move |e| NetError::State {
        path: path.to_path_buf(),
        source: e,
    }
}

fn corrupt(path: &Path) -> impl Fn(serde_json::Error) -> NetError + '_ {
    move |e| NetError::StateCorrupt {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Reads a JSON file; `None` when it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, NetError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(corrupt(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes a JSON file atomically: temporary file, fsync, rename.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), NetError> {
    use std::io::Write;
    let err = io_err(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(&err)?;
    }
    let bytes = serde_json::to_vec(value).map_err(corrupt(path))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(&err)?;
    f.write_all(&bytes).map_err(&err)?;
    f.sync_all().map_err(&err)?;
    std::fs::rename(&tmp, path).map_err(&err)
}

impl NetState {
    /// Loads the host file and the phone files, or an empty state when
    /// neither exists. Leftover temporary files (a crash mid-write) are
    /// ignored: the rename never happened.
    pub fn load(path: &Path) -> Result<Self, NetError> {
        let mut st = Self::default();
        if let Some(host) = read_json::<HostRecord>(path)? {
            st.shared_bandwidth_mbit = host.shared_bandwidth_mbit;
            st.port_cursor = host.port_cursor;
            st.seq = host.seq;
            st.phones = host.phones;
        }
        let dir = phones_dir(path);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(st),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let file = entry.map_err(io_err(&dir))?.path();
            if file.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(rec) = read_json::<PhoneRecord>(&file)? else {
                continue;
            };
            if rec.seq > st.seq {
                st.seq = rec.seq;
                st.port_cursor = rec.port_cursor;
            }
            st.phones.insert(rec.phone.phone_id.clone(), rec.phone);
        }
        Ok(st)
    }

    /// Writes everything: the host file and every phone's file (phone
    /// files of phones no longer known are removed).
    pub fn save(&mut self, path: &Path) -> Result<(), NetError> {
        let ids: Vec<String> = self.phones.keys().cloned().collect();
        for id in &ids {
            self.save_phone(path, id)?;
        }
        let dir = phones_dir(path);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let keep: BTreeSet<PathBuf> = ids.iter().map(|id| phone_file(&dir, id)).collect();
            for entry in entries.flatten() {
                let file = entry.path();
                if !keep.contains(&file) {
                    std::fs::remove_file(&file).map_err(io_err(&file))?;
                }
            }
        }
        self.save_host(path)
    }

    /// Writes the host file (shared bandwidth and cursor).
    pub fn save_host(&mut self, path: &Path) -> Result<(), NetError> {
        self.seq += 1;
        write_json(
            path,
            &HostRecord {
                shared_bandwidth_mbit: self.shared_bandwidth_mbit,
                port_cursor: self.port_cursor,
                seq: self.seq,
                phones: BTreeMap::new(),
            },
        )
    }

    /// Writes one phone's file, or removes it when the phone is gone.
    pub fn save_phone(&mut self, path: &Path, phone_id: &str) -> Result<(), NetError> {
        let file = phone_file(&phones_dir(path), phone_id);
        let Some(phone) = self.phones.get(phone_id) else {
            return match std::fs::remove_file(&file) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(&file)(e)),
            };
        };
        self.seq += 1;
        write_json(
            &file,
            &PhoneRecord {
                phone: phone.clone(),
                port_cursor: self.port_cursor,
                seq: self.seq,
            },
        )
    }

    /// Removes the host file and the phone directory.
    pub fn remove_files(path: &Path) -> Result<(), NetError> {
        let dir = phones_dir(path);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// The lowest free slot and its address (slot n has host address n + 2;
    /// the bridge holds the first).
    pub fn next_slot(&self, cfg: &NetConfig) -> Result<(u32, Ipv4Addr), NetError> {
        let used: BTreeSet<u32> = self.phones.values().map(|p| p.index).collect();
        let mut index = 0u32;
        while used.contains(&index) {
            index += 1;
        }
        let ip = cfg
            .subnet
            .host(index + 2)
            .ok_or_else(|| NetError::AddressesExhausted {
                subnet: cfg.subnet.to_string(),
            })?;
        Ok((index, ip))
    }

    /// Plans the mappings of `phone_id` for `requests`: a listen port that is
    /// already mapped keeps its access port; new ones get free ports that
    /// are neither held by a phone nor in `busy` (host sockets). Pure: the
    /// state changes only through the returned plan.
    pub fn plan_ports(
        &self,
        cfg: &NetConfig,
        phone_id: &str,
        requests: &[PortRequest],
        busy: &BTreeSet<u16>,
    ) -> Result<(Vec<PortMapping>, u16), NetError> {
        let current: BTreeMap<u16, u16> = self
            .phones
            .get(phone_id)
            .map(|p| {
                p.ports
                    .iter()
                    .map(|m| (m.listen_port, m.access_port))
                    .collect()
            })
            .unwrap_or_default();
        // A bitmap: building a set of every held port is the allocator's
        // main cost with tens of thousands of mappings.
        let mut taken = PortBits::default();
        for p in self.phones.values().filter(|p| p.phone_id != phone_id) {
            for m in &p.ports {
                taken.insert(m.access_port);
            }
        }
        for &p in current.values() {
            taken.insert(p);
        }
        let (first, last) = (cfg.access_port_first, cfg.access_port_last);
        let span = u32::from(last - first) + 1;
        let mut cursor = if (first..=last).contains(&self.port_cursor) {
            self.port_cursor
        } else {
            first
        };
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            let access_port = match current.get(&r.listen_port) {
                Some(&p) => p,
                None => {
                    let mut found = None;
                    for _ in 0..span {
                        let p = cursor;
                        cursor = if cursor == last { first } else { cursor + 1 };
                        if !taken.contains(&p) && !busy.contains(&p) {
                            found = Some(p);
                            break;
                        }
                    }
                    let p = found.ok_or(NetError::PortsExhausted { first, last })?;
                    taken.insert(p);
                    p
                }
            };
            out.push(PortMapping {
                name: r.name.clone(),
                listen_port: r.listen_port,
                access_port,
                internet_accessible: r.internet_accessible,
                system: r.system,
            });
        }
        Ok((out, cursor))
    }

    /// The access info of a phone's mappings.
    pub fn access_info(
        &self,
        cfg: &NetConfig,
        phone_id: &str,
    ) -> Result<Vec<AccessInfo>, NetError> {
        let phone = self
            .phones
            .get(phone_id)
            .ok_or_else(|| NetError::UnknownPhone {
                phone_id: phone_id.to_string(),
            })?;
        Ok(phone
            .ports
            .iter()
            .map(|m| AccessInfo {
                phone_ip: phone.ip.to_string(),
                server_ip: cfg.server_ip.to_string(),
                public_ip: match (m.internet_accessible, cfg.public_ip) {
                    (true, Some(ip)) => ip.to_string(),
                    (true, None) => cfg.server_ip.to_string(),
                    (false, _) => String::new(),
                },
                listen_port: m.listen_port,
                access_port: m.access_port,
                kind: m.name.clone(),
            })
            .collect())
    }
}

/// A set of ports as 65,536 bits.
struct PortBits(Box<[u64; 1024]>);

impl Default for PortBits {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl PortBits {
    fn insert(&mut self, p: u16) {
        self.0[usize::from(p >> 6)] |= 1 << (p & 63);
    }

    fn contains(&self, p: &u16) -> bool {
        self.0[usize::from(p >> 6)] & (1 << (p & 63)) != 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn config(first: u16, last: u16) -> NetConfig {
        NetConfig {
            table: "cph".into(),
            bridge: "cphbr0".into(),
            veth_prefix: "cphv".into(),
            subnet: "10.201.0.0/24".parse().unwrap(),
            server_ip: Ipv4Addr::new(192, 168, 1, 10),
            public_ip: Some(Ipv4Addr::new(203, 0, 113, 7)),
            private_prefixes: vec!["192.168.0.0/16".parse().unwrap()],
            access_port_first: first,
            access_port_last: last,
            max_ports_per_phone: 10,
            state_path: PathBuf::from("/nonexistent/net.json"),
            host_netns: None,
        }
    }

    fn req(name: &str, port: u16, public: bool) -> PortRequest {
        PortRequest {
            name: name.into(),
            listen_port: port,
            internet_accessible: public,
            system: false,
        }
    }

    fn phone(id: &str, index: u32, ports: Vec<PortMapping>) -> PhoneNet {
        PhoneNet {
            phone_id: id.into(),
            index,
            ip: Ipv4Addr::new(10, 201, 0, index as u8 + 2),
            host_if: format!("cphv{index}"),
            netns: PathBuf::from("/run/netns/x"),
            ports,
            bandwidth: BandwidthLimit::Unlimited,
            traffic: TrafficType::Direct,
        }
    }

    #[test]
    fn allocator_skips_held_and_busy_ports_and_keeps_existing() {
        let cfg = config(10000, 10009);
        let mut st = NetState::default();
        let busy: BTreeSet<u16> = [10001].into();
        let (m, cur) = st
            .plan_ports(
                &cfg,
                "a",
                &[req("x", 20000, true), req("y", 20001, false)],
                &busy,
            )
            .unwrap();
        assert_eq!(
            m.iter().map(|m| m.access_port).collect::<Vec<_>>(),
            [10000, 10002]
        );
        st.phones.insert("a".into(), phone("a", 0, m.clone()));
        st.port_cursor = cur;
        // Same listen port keeps its access port; a new one gets the next.
        let (m2, _) = st
            .plan_ports(
                &cfg,
                "a",
                &[req("y", 20001, false), req("z", 20002, true)],
                &busy,
            )
            .unwrap();
        assert_eq!(m2[0].access_port, 10002);
        assert_eq!(m2[1].access_port, 10003);
        // Another phone never gets a held port.
        let (m3, _) = st
            .plan_ports(&cfg, "b", &[req("x", 20000, true)], &busy)
            .unwrap();
        assert_eq!(m3[0].access_port, 10003);
    }

    #[test]
    fn allocator_reports_exhaustion_and_wraps() {
        let cfg = config(10000, 10002);
        let mut st = NetState::default();
        let (m, cur) = st
            .plan_ports(
                &cfg,
                "a",
                &[req("x", 20000, true), req("y", 20001, true)],
                &BTreeSet::new(),
            )
            .unwrap();
        st.phones.insert("a".into(), phone("a", 0, m));
        st.port_cursor = cur;
        let err = st
            .plan_ports(
                &cfg,
                "b",
                &[req("x", 20000, true), req("y", 20001, true)],
                &BTreeSet::new(),
            )
            .unwrap_err();
        assert!(matches!(
            err,
            NetError::PortsExhausted {
                first: 10000,
                last: 10002
            }
        ));
        // Free the first phone: the cursor wraps round to the freed ports.
        st.phones.clear();
        let (m, _) = st
            .plan_ports(
                &cfg,
                "b",
                &[req("x", 20000, true), req("y", 20001, true)],
                &BTreeSet::new(),
            )
            .unwrap();
        assert_eq!(
            m.iter().map(|m| m.access_port).collect::<Vec<_>>(),
            [10002, 10000]
        );
    }

    #[test]
    fn state_round_trips_through_the_file_and_access_info_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.json");
        assert_eq!(NetState::load(&path).unwrap(), NetState::default());
        let mut st = NetState::default();
        st.phones.insert(
            "a".into(),
            phone(
                "a",
                0,
                vec![
                    PortMapping {
                        name: "web".into(),
                        listen_port: 20000,
                        access_port: 10005,
                        internet_accessible: true,
                        system: false,
                    },
                    PortMapping {
                        name: "db".into(),
                        listen_port: 20001,
                        access_port: 10006,
                        internet_accessible: false,
                        system: false,
                    },
                ],
            ),
        );
        st.shared_bandwidth_mbit = 300;
        st.save(&path).unwrap();
        let back = NetState::load(&path).unwrap();
        assert_eq!(back, st);
        let info = back.access_info(&config(10000, 10009), "a").unwrap();
        assert_eq!(info[0].public_ip, "203.0.113.7");
        assert_eq!(info[0].phone_ip, "10.201.0.2");
        assert_eq!(info[0].server_ip, "192.168.1.10");
        assert_eq!(info[0].access_port, 10005);
        assert_eq!(info[1].public_ip, "");
        assert_eq!(info[1].kind, "db");
        let json = serde_json::to_value(&info[1]).unwrap();
        assert_eq!(json["type"], "db");
        assert!(back.access_info(&config(10000, 10009), "zz").is_err());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            NetState::load(&path),
            Err(NetError::StateCorrupt { .. })
        ));
    }

    #[test]
    fn one_file_per_phone_newest_cursor_and_the_earlier_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network.json");
        let mut st = NetState {
            shared_bandwidth_mbit: 100,
            ..NetState::default()
        };
        st.save_host(&path).unwrap();
        st.phones.insert("a".into(), phone("a", 0, vec![]));
        st.port_cursor = 10003;
        st.save_phone(&path, "a").unwrap();
        // An id that is not a plain name is stored under a hex name.
        st.phones.insert("../b".into(), phone("../b", 1, vec![]));
        st.port_cursor = 10007;
        st.save_phone(&path, "../b").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(phones_dir(&path))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a.json", "x-2e2e2f62.json"]);
        let back = NetState::load(&path).unwrap();
        assert_eq!(back.phones.len(), 2);
        assert_eq!(back.port_cursor, 10007, "newest record's cursor");
        assert_eq!(back.shared_bandwidth_mbit, 100);
        // Removing a phone removes its file only.
        st.phones.remove("a");
        st.save_phone(&path, "a").unwrap();
        assert_eq!(
            NetState::load(&path)
                .unwrap()
                .phones
                .keys()
                .collect::<Vec<_>>(),
            ["../b"]
        );
        // The earlier layout: phones inside the host file.
        let legacy = dir.path().join("old.json");
        let mut phones = BTreeMap::new();
        phones.insert("c".to_string(), phone("c", 2, vec![]));
        std::fs::write(
            &legacy,
            serde_json::to_vec(&serde_json::json!({
                "phones": phones,
                "shared_bandwidth_mbit": 50,
                "port_cursor": 10001,
            }))
            .unwrap(),
        )
        .unwrap();
        let mut old = NetState::load(&legacy).unwrap();
        assert_eq!(old.phones["c"].index, 2);
        old.save(&legacy).unwrap();
        assert!(phones_dir(&legacy).join("c.json").exists());
        assert!(!std::fs::read_to_string(&legacy)
            .unwrap()
            .contains("\"phones\""));
        assert_eq!(NetState::load(&legacy).unwrap(), old);
        NetState::remove_files(&legacy).unwrap();
        assert!(!legacy.exists() && !phones_dir(&legacy).exists());
    }

    #[test]
    fn slots_fill_gaps() {
        let cfg = config(10000, 10009);
        let mut st = NetState::default();
        st.phones.insert("a".into(), phone("a", 0, vec![]));
        st.phones.insert("c".into(), phone("c", 2, vec![]));
        assert_eq!(
            st.next_slot(&cfg).unwrap(),
            (1, Ipv4Addr::new(10, 201, 0, 3))
        );
    }
}
