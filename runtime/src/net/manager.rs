//! Applies network plans to the kernel and keeps the state files in step.
//!
//! Every public operation validates and plans first (pure), then applies
//! with as few outside commands as possible (one `ip -batch`, one `tc
//! -batch`, one nftables transaction: `nft -f` for the whole table, a netlink
//! batch for a phone's map elements), rolls back what it created when a
//! later step fails, and saves the state last. The port hot path starts no
//! process: listening ports, map elements and conntrack entries all go over
//! netlink ([`super::nfnl`]).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tracing::{debug, info, warn};

use super::cmd::{self, Invocation, Runner, SystemRunner};
use super::nfnl;
use super::state::{phones_dir, NetState};
use super::validate::{validate_bandwidth_limit, validate_ports, validate_shared_bandwidth};
use super::{
    nft, tc, AccessInfo, BandwidthLimit, NetConfig, NetError, PhoneNet, PortRequest, TrafficType,
};

/// Name of the phone's interface inside its namespace.
pub const PHONE_IF: &str = "eth0";

/// The agent's phone networking: one per host.
pub struct NetManager<R: Runner = SystemRunner> {
    cfg: NetConfig,
    runner: R,
    state: NetState,
    /// Netlink sockets in the host namespace (map elements and conntrack;
    /// listening sockets), opened on first use and reopened after a socket
    /// error.
    nfnl: Option<nfnl::Socket>,
    diag: Option<nfnl::DiagSocket>,
    /// Drops unmapped flows' conntrack entries off the caller's path (see
    /// [`ConntrackWorker`]).
    conntrack: ConntrackWorker,
}

/// Work for the conntrack thread.
enum CtWork {
    /// Drop the entries the phone at this address answers: all, or those
    /// of these listen ports.
    Drop(Ipv4Addr, Option<BTreeSet<u16>>),
    /// Answer once everything queued before is done.
    Settle(mpsc::Sender<()>),
}

/// A thread with its own netlink socket in the host namespace that drops
/// conntrack entries of unmapped ports and removed phones. Finding them
/// walks the whole conntrack table in the kernel, which grows with the
/// host's connections (about 1 ms per 1,000 entries here), so a port
/// change does not wait for it: the mapping is gone at once (no new flow
/// can start), the established flows are cut a moment later.
struct ConntrackWorker {
    tx: Option<mpsc::Sender<CtWork>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConntrackWorker {
    fn start(host_netns: Option<PathBuf>) -> Self {
        let (tx, rx) = mpsc::channel::<CtWork>();
        let thread = std::thread::Builder::new()
            .name("cph-conntrack".into())
            .spawn(move || {
                let mut sock: Option<nfnl::Socket> = None;
                for work in rx {
                    match work {
                        CtWork::Drop(ip, ports) => {
                            drop_flows(&mut sock, host_netns.as_deref(), ip, ports.as_ref())
                        }
                        CtWork::Settle(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .ok();
        if thread.is_none() {
            warn!("conntrack thread not started; entries are dropped in line");
        }
        Self {
            tx: thread.as_ref().map(|_| tx),
            thread,
        }
    }
}

impl Drop for ConntrackWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once the queue is done.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Drops the conntrack entries the phone at `phone_ip` answers: all, or
/// those from one of `ports` (TCP and UDP). One filtered listing, then a
/// deletion only where flows exist; failures are logged, not returned.
/// The socket is opened on first use and again after socket trouble.
fn drop_flows(
    sock: &mut Option<nfnl::Socket>,
    netns: Option<&Path>,
    phone_ip: Ipv4Addr,
    ports: Option<&BTreeSet<u16>>,
) {
    let wanted = |f: &nfnl::Flow| match ports {
        None => true,
        Some(p) => {
            let tcp_udp = [libc::IPPROTO_TCP, libc::IPPROTO_UDP].contains(&i32::from(f.proto));
            tcp_udp && p.contains(&f.phone_port)
        }
    };
    let s = match sock {
        Some(s) => s,
        None => match nfnl::Socket::open(netns) {
            Ok(s) => sock.insert(s),
            Err(e) => {
                warn!(%phone_ip, error = %e, "cannot open conntrack socket");
                return;
            }
        },
    };
    let dropped = s.conntrack_flows_of(phone_ip).and_then(|flows| {
        let flows: Vec<nfnl::Flow> = flows.into_iter().filter(wanted).collect();
        if flows.is_empty() {
            return Ok(0);
        }
        s.conntrack_delete(phone_ip, &flows)
    });
    match dropped {
        Ok(0) => {}
        Ok(count) => debug!(%phone_ip, count, "conntrack entries dropped"),
        Err(e) => {
            warn!(%phone_ip, error = %e, "cannot drop conntrack entries");
            if e.errno().is_none() {
                *sock = None;
            }
        }
    }
}

impl NetManager<SystemRunner> {
    /// Opens with the real command runner.
    pub fn open(cfg: NetConfig, shared_bandwidth_mbit: u32) -> Result<Self, NetError> {
        Self::with_runner(cfg, SystemRunner, shared_bandwidth_mbit)
    }
}

impl<R: Runner> NetManager<R> {
    /// Loads the state file (if any) without touching the kernel. The shared
    /// bandwidth is taken from the state when one exists.
    pub fn with_runner(
        cfg: NetConfig,
        runner: R,
        shared_bandwidth_mbit: u32,
    ) -> Result<Self, NetError> {
        cfg.check()?;
        let mut state = NetState::load(&cfg.state_path)?;
        if !state.phones.is_empty() && !phones_dir(&cfg.state_path).exists() {
            // The earlier single-file layout: split it now, before a phone's
            // own save would leave the others only in the host file.
            state.save(&cfg.state_path)?;
        }
        if state.shared_bandwidth_mbit == 0 {
            state.shared_bandwidth_mbit = validate_shared_bandwidth(shared_bandwidth_mbit)?;
        }
        let conntrack = ConntrackWorker::start(cfg.host_netns.clone());
        Ok(Self {
            cfg,
            runner,
            state,
            nfnl: None,
            diag: None,
            conntrack,
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    pub fn state(&self) -> &NetState {
        &self.state
    }

    pub fn phone(&self, phone_id: &str) -> Option<&PhoneNet> {
        self.state.phones.get(phone_id)
    }

    fn host(&self, inv: Invocation) -> Result<String, NetError> {
        let inv = inv.in_netns(self.cfg.host_netns.as_deref());
        self.runner.run(&inv)
    }

    fn host_ip(&self, lines: Vec<String>) -> Result<(), NetError> {
        if lines.is_empty() {
            return Ok(());
        }
        self.host(cmd::ip_batch(&lines)).map(drop)
    }

    fn host_tc(&self, lines: Vec<String>) -> Result<(), NetError> {
        if lines.is_empty() {
            return Ok(());
        }
        self.host(cmd::tc_batch(&lines)).map(drop)
    }

    /// `render`'s lines for each shaped device (downloads, uploads), for
    /// one `tc` batch.
    fn shaping_lines(&self, render: impl Fn(&str) -> Vec<String>) -> Vec<String> {
        self.cfg
            .shaped_devs()
            .iter()
            .flat_map(|d| render(d))
            .collect()
    }

    /// Deletes, in one `tc` batch, the upload filters and then the classes
    /// (both trees) of the slots `gone` selects among those present.
    fn delete_shaping(&self, gone: impl Fn(u32) -> bool) -> Result<(), NetError> {
        let up = self.cfg.upload_dev();
        let filters = tc::parse_upload_filters(&self.host(cmd::tc_filter_show(&up))?);
        let mut dels: Vec<String> = filters
            .into_iter()
            .filter(|&i| gone(i))
            .flat_map(|i| tc::render_upload_filter_delete(&up, i))
            .collect();
        for dev in self.cfg.shaped_devs() {
            let present = tc::parse_class_minors(&self.host(cmd::tc_class_show(&dev))?);
            dels.extend(
                present
                    .into_iter()
                    .filter_map(|m| m.checked_sub(nft::class_minor(0)))
                    .filter(|&i| gone(i))
                    .flat_map(|i| tc::render_phone_delete(&dev, i)),
            );
        }
        self.host_tc(dels)
    }

    fn host_nft(&self, text: String) -> Result<(), NetError> {
        if text.is_empty() {
            return Ok(());
        }
        self.host(cmd::nft_batch(text)).map(drop)
    }

    /// Runs `f` on the netlink socket in the host namespace, opening it on
    /// first use; after socket trouble (not a refusal) it is reopened.
    fn netlink<T>(
        &mut self,
        f: impl FnOnce(&mut nfnl::Socket) -> Result<T, nfnl::NfnlError>,
    ) -> Result<T, nfnl::NfnlError> {
        let sock = match &mut self.nfnl {
            Some(s) => s,
            None => self
                .nfnl
                .insert(nfnl::Socket::open(self.cfg.host_netns.as_deref())?),
        };
        let r = f(sock);
        if r.as_ref().is_err_and(|e| e.errno().is_none()) {
            self.nfnl = None;
        }
        r
    }

    /// Applies one phone's element changes as one netlink transaction.
    fn apply_phone_delta(
        &mut self,
        old: Option<&PhoneNet>,
        new: Option<&PhoneNet>,
    ) -> Result<(), NetError> {
        let batch = nft::phone_delta(&self.cfg, old, new);
        if batch.is_empty() {
            return Ok(());
        }
        self.netlink(|s| s.apply(&batch)).map_err(NetError::from)
    }

    /// Persists one phone's record (or its removal): one small file.
    fn save_phone(&mut self, phone_id: &str) -> Result<(), NetError> {
        self.state.save_phone(&self.cfg.state_path, phone_id)
    }

    fn gateway(&self) -> Result<Ipv4Addr, NetError> {
        self.cfg
            .bridge_ip()
            .ok_or_else(|| NetError::AddressesExhausted {
                subnet: self.cfg.subnet.to_string(),
            })
    }

    /// Names of the links in the host namespace.
    pub fn host_links(&self) -> Result<Vec<String>, NetError> {
        Ok(parse_link_names(&self.host(cmd::ip_links())?))
    }

    fn nft_table_exists(&self) -> Result<bool, NetError> {
        let out = self.host(cmd::nft_list_tables())?;
        let want = format!("table ip {}", self.cfg.table);
        Ok(out.lines().any(|l| l.trim() == want))
    }

    /// Ports with a listening socket on the host (what `ss -l -t -u`
    /// shows, read over sock_diag).
    fn busy_ports(&mut self) -> Result<BTreeSet<u16>, NetError> {
        let sock = match &mut self.diag {
            Some(s) => s,
            None => self
                .diag
                .insert(nfnl::DiagSocket::open(self.cfg.host_netns.as_deref())?),
        };
        let r = sock.listening_ports();
        if r.as_ref().is_err_and(|e| e.errno().is_none()) {
            self.diag = None;
        }
        Ok(r?)
    }

    /// Creates or repairs the host side: bridge with the gateway address,
    /// forwarding, the whole nftables table from the state, the HTB root and
    /// every phone class. Idempotent; a full reconcile calls it.
    pub fn setup_host(&mut self) -> Result<(), NetError> {
        let gw = self.gateway()?;
        let br = self.cfg.bridge.clone();
        let links = self.host_links()?;
        let up = self.cfg.upload_dev();
        let mut lines = Vec::new();
        if !links.contains(&br) {
            lines.push(format!("link add {br} txqueuelen 1000 type bridge"));
        }
        if !links.contains(&up) {
            self.host_ip(vec![format!("link add {up} txqueuelen 1000 type ifb")])
                .map_err(|e| NetError::KernelLacks {
                    feature: "the ifb device uploads are shaped on (CONFIG_IFB)",
                    detail: e.to_string(),
                })?;
        }
        lines.push(format!(
            "addr replace {gw}/{} dev {br}",
            self.cfg.subnet.prefix
        ));
        lines.push(format!("link set {br} up"));
        lines.push(format!("link set {up} up"));
        self.host_ip(lines)?;
        self.host(cmd::sysctl("net.ipv4.ip_forward", "1"))?;
        self.host_nft(nft::render_table(&self.cfg, self.state.phones.values()))?;
        let shared = self.state.shared_bandwidth_mbit;
        let mut tcl = Vec::new();
        for dev in self.cfg.shaped_devs() {
            let qdiscs = self.host(cmd::tc_qdisc_show(&dev))?;
            let mut root = tc::render_root(&dev, shared);
            if tc::has_htb_root(&qdiscs) {
                // HTB cannot change its root in place; classes are replaced below.
                root.remove(0);
            }
            tcl.extend(root);
            for p in self.state.phones.values() {
                tcl.extend(tc::render_phone_add(&dev, p, shared));
            }
        }
        for p in self.state.phones.values() {
            tcl.extend(tc::render_upload_filter(&up, p));
            // Phones plumbed before uploads were shaped get their redirect.
            if links.contains(&p.host_if) {
                tcl.extend(tc::render_upload_redirect(
                    &p.host_if,
                    &up,
                    &self.cfg.subnet,
                ));
            }
        }
        self.host_tc(tcl)
    }

    /// After an agent restart: rebuilds the nftables table and tc tree from
    /// the state in place (established connections keep their conntrack
    /// bindings), re-plumbs phones whose namespace exists but whose veth is
    /// gone, and deletes links and classes of ours the state does not know.
    pub fn reconcile(&mut self) -> Result<(), NetError> {
        self.setup_host()?;
        let links = self.host_links()?;
        let known: BTreeSet<&str> = self
            .state
            .phones
            .values()
            .map(|p| p.host_if.as_str())
            .collect();
        let mut stale = Vec::new();
        for l in &links {
            let ours = l
                .strip_prefix(&self.cfg.veth_prefix)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()));
            if ours && !known.contains(l.as_str()) {
                stale.push(format!("link del {l}"));
            }
        }
        if !stale.is_empty() {
            info!(count = stale.len(), "deleting stale phone links");
            self.host_ip(stale)?;
        }
        let missing: Vec<PhoneNet> = self
            .state
            .phones
            .values()
            .filter(|p| !links.contains(&p.host_if))
            .cloned()
            .collect();
        for p in missing {
            if p.netns.exists() {
                info!(phone_id = %p.phone_id, "re-plumbing phone veth");
                // One phone's network is not every phone's: a failure is
                // its alone (it is tried again at its next attach).
                if let Err(e) = self.replumb(&p) {
                    warn!(phone_id = %p.phone_id, error = %e, "phone veth not re-plumbed");
                }
            } else {
                warn!(phone_id = %p.phone_id, netns = %p.netns.display(), "phone namespace gone; waiting for attach");
            }
        }
        let wanted: BTreeSet<u32> = self.state.phones.values().map(|p| p.index).collect();
        self.delete_shaping(|i| !wanted.contains(&i))
    }

    /// [`Self::plumb`] of a phone whose veth went: a link the phone made in
    /// its place under the name its end takes (it can delete its end, and
    /// the host's goes with it) is removed first.
    fn replumb(&self, p: &PhoneNet) -> Result<(), NetError> {
        if self.plumb(p).is_ok() {
            return Ok(());
        }
        let squatter = cmd::ip_batch(&[format!("link del {PHONE_IF}")]).in_netns(Some(&p.netns));
        let _ = self.runner.run(&squatter);
        self.plumb(p)
    }

    /// Creates the veth pair into the phone namespace and configures it;
    /// nothing is left of it on a failure.
    fn plumb(&self, p: &PhoneNet) -> Result<(), NetError> {
        let br = &self.cfg.bridge;
        let h = &p.host_if;
        if let Err(e) = self.host_ip(vec![
            format!(
                "link add {h} type veth peer name {PHONE_IF} address {} netns {}",
                phone_mac(p.ip),
                p.netns.display()
            ),
            format!("link set {h} master {br}"),
            format!("link set {h} up"),
        ]) {
            // The batch stops at its first failure: a pair it made goes.
            let _ = self.host_ip(vec![format!("link del {h}")]);
            return Err(e);
        }
        // Uploads: every frame the phone sends goes through the upload
        // device's tree first.
        let redirect = tc::render_upload_redirect(h, &self.cfg.upload_dev(), &self.cfg.subnet);
        if let Err(e) = self.host_tc(redirect) {
            let _ = self.host_ip(vec![format!("link del {h}")]);
            return Err(NetError::KernelLacks {
                feature: "the tc ingress qdisc, u32 filter and mirred action uploads are \
                          redirected with (CONFIG_NET_SCH_INGRESS, CONFIG_NET_CLS_U32, \
                          CONFIG_NET_ACT_MIRRED)",
                detail: e.to_string(),
            });
        }
        let gw = match p.traffic {
            TrafficType::Direct => self.gateway()?,
            TrafficType::Routing(enc) => enc,
        };
        let inside = cmd::ip_batch(&[
            "link set lo up".into(),
            format!(
                "addr replace {}/{} dev {PHONE_IF}",
                p.ip, self.cfg.subnet.prefix
            ),
            format!("link set {PHONE_IF} up"),
            format!("route replace default via {gw} dev {PHONE_IF}"),
        ])
        .in_netns(Some(&p.netns));
        if let Err(e) = self.runner.run(&inside) {
            let _ = self.host_ip(vec![format!("link del {h}")]);
            return Err(e);
        }
        Ok(())
    }

    /// Gives a phone its network: slot, address, veth into `netns`, port
    /// mappings, download limit. Nothing is changed if validation fails.
    pub fn add_phone(
        &mut self,
        phone_id: &str,
        netns: &Path,
        ports: &[PortRequest],
        bandwidth_limit_kbit: i64,
    ) -> Result<Vec<AccessInfo>, NetError> {
        self.add(phone_id, netns, ports, bandwidth_limit_kbit, None)
    }

    /// Like [`Self::add_phone`], at a fixed address of the subnet (the
    /// encoding container's, which phones route through). Phones never get
    /// a slot that is taken.
    pub fn add_phone_at(
        &mut self,
        phone_id: &str,
        netns: &Path,
        ip: Ipv4Addr,
        ports: &[PortRequest],
        bandwidth_limit_kbit: i64,
    ) -> Result<Vec<AccessInfo>, NetError> {
        let offset = u32::from(ip).wrapping_sub(u32::from(self.cfg.subnet.network()));
        let index = offset
            .checked_sub(2)
            .filter(|&i| self.cfg.subnet.host(i + 2) == Some(ip))
            .ok_or_else(|| {
                NetError::invalid(
                    "ip",
                    format!("{ip} is not a phone address of {}", self.cfg.subnet),
                )
            })?;
        if let Some(holder) = self.state.phones.values().find(|p| p.index == index) {
            return Err(NetError::invalid(
                "ip",
                format!("{ip} is held by {}", holder.phone_id),
            ));
        }
        self.add(
            phone_id,
            netns,
            ports,
            bandwidth_limit_kbit,
            Some((index, ip)),
        )
    }

    fn add(
        &mut self,
        phone_id: &str,
        netns: &Path,
        ports: &[PortRequest],
        bandwidth_limit_kbit: i64,
        slot: Option<(u32, Ipv4Addr)>,
    ) -> Result<Vec<AccessInfo>, NetError> {
        if self.state.phones.contains_key(phone_id) {
            return Err(NetError::PhoneExists {
                phone_id: phone_id.to_string(),
            });
        }
        validate_ports(ports, self.cfg.max_ports_per_phone)?;
        let bandwidth = validate_bandwidth_limit(bandwidth_limit_kbit)?;
        let (index, ip) = match slot {
            Some(s) => s,
            None => self.state.next_slot(&self.cfg)?,
        };
        let busy = self.busy_ports()?;
        let (mappings, cursor) = self.state.plan_ports(&self.cfg, phone_id, ports, &busy)?;
        let phone = PhoneNet {
            phone_id: phone_id.to_string(),
            index,
            ip,
            host_if: self.cfg.veth_name(index),
            netns: netns.to_path_buf(),
            ports: mappings,
            bandwidth,
            traffic: TrafficType::Direct,
        };
        self.plumb(&phone)?;
        let shared = self.state.shared_bandwidth_mbit;
        let mut tcl = self.shaping_lines(|dev| tc::render_phone_add(dev, &phone, shared));
        tcl.extend(tc::render_upload_filter(&self.cfg.upload_dev(), &phone));
        let applied = self
            .host_tc(tcl)
            .and_then(|()| self.apply_phone_delta(None, Some(&phone)));
        if let Err(e) = applied {
            let _ = self.delete_shaping(|i| i == index);
            let _ = self.host_ip(vec![format!("link del {}", phone.host_if)]);
            return Err(e);
        }
        info!(phone_id, %ip, ports = phone.ports.len(), "phone network added");
        self.state.port_cursor = cursor;
        self.state.phones.insert(phone_id.to_string(), phone);
        self.save_phone(phone_id)?;
        self.access_info(phone_id)
    }

    /// Moves a known phone into a new namespace (its container restarted),
    /// keeping address, ports and limit.
    pub fn attach_phone(&mut self, phone_id: &str, netns: &Path) -> Result<(), NetError> {
        let mut p = self.known(phone_id)?.clone();
        if self.host_links()?.contains(&p.host_if) {
            self.host_ip(vec![format!("link del {}", p.host_if)])?;
        }
        p.netns = netns.to_path_buf();
        self.plumb(&p)?;
        self.state.phones.insert(phone_id.to_string(), p);
        self.save_phone(phone_id)
    }

    fn known(&self, phone_id: &str) -> Result<&PhoneNet, NetError> {
        self.state
            .phones
            .get(phone_id)
            .ok_or_else(|| NetError::UnknownPhone {
                phone_id: phone_id.to_string(),
            })
    }

    /// Replaces a phone's port mappings in one transaction; kept listen ports
    /// keep their access ports, dropped ones lose their conntrack entries.
    pub fn set_ports(
        &mut self,
        phone_id: &str,
        ports: &[PortRequest],
    ) -> Result<Vec<AccessInfo>, NetError> {
        let old = self.known(phone_id)?.clone();
        validate_ports(ports, self.cfg.max_ports_per_phone)?;
        let busy = self.busy_ports()?;
        let (mappings, cursor) = self.state.plan_ports(&self.cfg, phone_id, ports, &busy)?;
        let mut new = old.clone();
        new.ports = mappings;
        self.apply_phone_delta(Some(&old), Some(&new))?;
        let dropped: BTreeSet<u16> = old
            .ports
            .iter()
            .filter(|m| !new.ports.iter().any(|n| n == *m))
            .map(|m| m.listen_port)
            .collect();
        self.state.port_cursor = cursor;
        self.state.phones.insert(phone_id.to_string(), new);
        self.save_phone(phone_id)?;
        if !dropped.is_empty() {
            self.drop_conntrack(old.ip, Some(&dropped));
        }
        self.access_info(phone_id)
    }

    /// Queues the dropping of the conntrack entries the phone answers (all,
    /// or those of `ports`) for the conntrack thread.
    fn drop_conntrack(&mut self, phone_ip: Ipv4Addr, ports: Option<&BTreeSet<u16>>) {
        let work = CtWork::Drop(phone_ip, ports.cloned());
        if let Some(tx) = &self.conntrack.tx {
            if tx.send(work).is_ok() {
                return;
            }
        }
        let mut sock = self.nfnl.take();
        drop_flows(&mut sock, self.cfg.host_netns.as_deref(), phone_ip, ports);
        self.nfnl = sock;
    }

    /// Waits until every conntrack drop queued so far is done.
    pub fn settle_conntrack(&self) {
        let Some(tx) = &self.conntrack.tx else {
            return;
        };
        let (done, wait) = mpsc::channel();
        if tx.send(CtWork::Settle(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Changes a phone's `com.cph.bandwidth_limit` in place (kbit/s, -1 =
    /// unlimited).
    pub fn set_bandwidth_limit(&mut self, phone_id: &str, kbit: i64) -> Result<(), NetError> {
        let limit: BandwidthLimit = validate_bandwidth_limit(kbit)?;
        let mut p = self.known(phone_id)?.clone();
        p.bandwidth = limit;
        let shared = self.state.shared_bandwidth_mbit;
        self.host_tc(self.shaping_lines(|dev| tc::render_phone_change(dev, &p, shared)))?;
        self.state.phones.insert(phone_id.to_string(), p);
        self.save_phone(phone_id)
    }

    /// Changes the server's shared bandwidth (Mbit/s) live.
    pub fn set_shared_bandwidth(&mut self, mbit: u32) -> Result<(), NetError> {
        let mbit = validate_shared_bandwidth(mbit)?;
        let phones = self.state.phones.values();
        self.host_tc(
            self.shaping_lines(|dev| tc::render_shared_change(dev, mbit, phones.clone())),
        )?;
        self.state.shared_bandwidth_mbit = mbit;
        self.state.save_host(&self.cfg.state_path)
    }

    /// Switches a phone's default route: `Direct` through the bridge,
    /// `Routing(ip)` through the encoding container at `ip` (on the subnet).
    pub fn set_traffic(&mut self, phone_id: &str, traffic: TrafficType) -> Result<(), NetError> {
        let mut p = self.known(phone_id)?.clone();
        let gw = match traffic {
            TrafficType::Direct => self.gateway()?,
            TrafficType::Routing(enc) => {
                if !self.cfg.subnet.contains(enc) || enc == p.ip {
                    return Err(NetError::invalid(
                        "traffic_type",
                        format!(
                            "encoding container address {enc} is not a neighbour on {}",
                            self.cfg.subnet
                        ),
                    ));
                }
                enc
            }
        };
        let inv = cmd::ip_batch(&[format!("route replace default via {gw} dev {PHONE_IF}")])
            .in_netns(Some(&p.netns));
        self.runner.run(&inv)?;
        p.traffic = traffic;
        self.state.phones.insert(phone_id.to_string(), p);
        self.save_phone(phone_id)
    }

    /// Removes a phone's network: map elements, class, veth, conntrack.
    pub fn remove_phone(&mut self, phone_id: &str) -> Result<(), NetError> {
        let p = self.known(phone_id)?.clone();
        match self.apply_phone_delta(Some(&p), None) {
            Err(NetError::Command { status, .. }) if status == libc::ENOENT => {
                // A removal cut off after some of its elements went: the
                // rest one at a time, those gone skipped, so it can finish.
                self.remove_elements_left(&p)?
            }
            r => r?,
        }
        self.delete_shaping(|i| i == p.index)?;
        if self.host_links()?.contains(&p.host_if) {
            self.host_ip(vec![format!("link del {}", p.host_if)])?;
        }
        self.state.phones.remove(phone_id);
        self.save_phone(phone_id)?;
        self.drop_conntrack(p.ip, None);
        info!(phone_id, "phone network removed");
        Ok(())
    }

    /// Deletes what is left of a phone's map elements, one at a time.
    fn remove_elements_left(&mut self, p: &PhoneNet) -> Result<(), NetError> {
        let batch = nft::phone_delta(&self.cfg, Some(p), None);
        for change in &batch.changes {
            for element in &change.elements {
                let one = nfnl::ElemBatch {
                    table: batch.table.clone(),
                    changes: vec![nfnl::MapChange {
                        elements: vec![element.clone()],
                        ..change.clone()
                    }],
                };
                match self.netlink(|s| s.apply(&one)) {
                    Err(e) if e.errno() != Some(nix::errno::Errno::ENOENT) => return Err(e.into()),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The access info the API shows for a phone.
    pub fn access_info(&self, phone_id: &str) -> Result<Vec<AccessInfo>, NetError> {
        self.state.access_info(&self.cfg, phone_id)
    }

    /// Removes everything this manager created: the table, the bridge and
    /// the upload device (and their tc trees), every phone veth, their
    /// conntrack entries and the state file.
    pub fn teardown(&mut self) -> Result<(), NetError> {
        if self.nft_table_exists()? {
            self.host_nft(nft::render_delete_table(&self.cfg))?;
        }
        let links = self.host_links()?;
        let mut lines: Vec<String> = self
            .state
            .phones
            .values()
            .filter(|p| links.contains(&p.host_if))
            .map(|p| format!("link del {}", p.host_if))
            .collect();
        for dev in self.cfg.shaped_devs() {
            if links.contains(&dev) {
                lines.push(format!("link del {dev}"));
            }
        }
        self.host_ip(lines)?;
        let ips: Vec<Ipv4Addr> = self.state.phones.values().map(|p| p.ip).collect();
        for ip in ips {
            self.drop_conntrack(ip, None);
        }
        self.settle_conntrack();
        self.state.phones.clear();
        NetState::remove_files(&self.cfg.state_path)
    }

    /// Where the host state file lives (phone files are in
    /// [`phones_dir`] of it).
    pub fn state_path(&self) -> PathBuf {
        self.cfg.state_path.clone()
    }
}

/// The phone interface's MAC, derived from its address (locally
/// administered), so a re-plumbed phone keeps it and neighbours' ARP
/// entries stay valid.
pub fn phone_mac(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:c9:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// Link names from `ip -o link show` (`2: name@peer: <...`).
pub fn parse_link_names(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let name = l.split(':').nth(1)?.trim();
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links_and_listeners() {
        let links = "1: lo: <LOOPBACK,UP> mtu 65536 qdisc noqueue\n\
                     5: cphv0@if4: <BROADCAST,MULTICAST,UP> mtu 1500 master cphbr0\n\
                     6: cphbr0: <BROADCAST> mtu 1500\n";
        assert_eq!(parse_link_names(links), ["lo", "cphv0", "cphbr0"]);
        let ss = "tcp   LISTEN 0      128          0.0.0.0:22        0.0.0.0:*\n\
                  tcp   LISTEN 0      4096            [::]:10005          [::]:*\n\
                  udp   UNCONN 0      0       127.0.0.53%lo:53        0.0.0.0:*\n";
        assert_eq!(cmd::parse_listening_ports(ss), [22, 53, 10005].into());
        assert_eq!(phone_mac(Ipv4Addr::new(10, 210, 0, 2)), "02:c9:0a:d2:00:02");
    }
}
