//! Buying servers: v1 (system network) and v2 (custom network) cloud
//! phone servers, each a free host of the model with its phones, and v2.1
//! cloud phone BMSs, hosts with no phones. An order takes all its hosts in
//! one transaction or none; each host's agent is then sent the server.

use std::collections::BTreeMap;

use axum::extract::{Extension, State};
use cph_agent::protocol::{CreateServer, ImageRef, PhoneSpec, PortSpec};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::Json;
use super::phones::VOLUME_MAX_GIB;
use super::servers::{BANDWIDTH_DEDICATED, BANDWIDTH_MIN, MAX_COUNT, MAX_PORTS, SERVER_NAME_MAX};
use super::validate;
use super::{ApiError, ApiResult, Caller, Reply, Shared};
use crate::catalog::{Catalog, ServerModel};
use crate::store::{new_id, NewServer, Order};

#[derive(Deserialize)]
pub struct PortBody {
    name: String,
    listen_port: i64,
    internet_accessible: Option<String>,
}

#[derive(Deserialize)]
pub struct BandWidthBody {
    band_width_id: Option<String>,
    band_width_share_type: Option<i32>,
    band_width_size: Option<i64>,
    band_width_charge_mode: Option<i32>,
}

#[derive(Deserialize)]
pub struct ExtendParam {
    charging_mode: Option<i32>,
    period_type: Option<i32>,
    period_num: Option<i32>,
    is_auto_pay: Option<i32>,
    is_auto_renew: Option<i32>,
}

/// The purchase body of v1 and v2 (fields one version lacks are optional).
#[derive(Deserialize)]
pub struct BuyBody {
    server_name: String,
    server_model_name: String,
    phone_model_name: String,
    image_id: String,
    count: i64,
    #[serde(default)]
    band_width: Option<BandWidthBody>,
    #[serde(default)]
    extend_param: Option<ExtendParam>,
    #[serde(default)]
    keypair_name: Option<String>,
    #[serde(default)]
    ports: Option<Vec<PortBody>>,
    #[serde(default)]
    subnet_cidr: Option<String>,
    #[serde(default)]
    tenant_vpc_id: Option<String>,
    #[serde(default)]
    nics: Option<Vec<Value>>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    phone_property: Option<String>,
}

pub(super) fn validate_ports(ports: &[PortBody]) -> Result<Vec<PortSpec>, ApiError> {
    if ports.len() > MAX_PORTS {
        return Err(ApiError::PortsLimit);
    }
    let mut names = std::collections::HashSet::new();
    let mut nums = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in ports {
        if p.name.is_empty()
            || p.name.len() > 16
            || p.name.eq_ignore_ascii_case("adb")
            || p.name.eq_ignore_ascii_case("vnc")
        {
            return Err(ApiError::PortName);
        }
        if !(10000..=50000).contains(&p.listen_port) {
            return Err(ApiError::ListenPort);
        }
        if !names.insert(p.name.clone()) {
            return Err(ApiError::PortNameConflict);
        }
        if !nums.insert(p.listen_port) {
            return Err(ApiError::ListenPortConflict);
        }
        let ia = p
            .internet_accessible
            .as_deref()
            .ok_or(ApiError::InternetAccessible)?;
        out.push(PortSpec {
            name: p.name.clone(),
            listen_port: p.listen_port as u16,
            internet_accessible: ia.eq_ignore_ascii_case("true"),
        });
    }
    Ok(out)
}

fn validate_extend(e: Option<&ExtendParam>) -> Result<(), ApiError> {
    let e = e.ok_or(ApiError::ExtendParam)?;
    if e.charging_mode != Some(0) {
        return Err(ApiError::ChargingMode);
    }
    let max = match e.period_type {
        Some(2) => 9,
        Some(3) => 10,
        _ => return Err(ApiError::PeriodType),
    };
    if !e.period_num.is_some_and(|n| (1..=max).contains(&n)) {
        return Err(ApiError::PeriodNum);
    }
    if e.is_auto_pay.is_some_and(|v| v != 0 && v != 1) {
        return Err(ApiError::AutoPay);
    }
    if e.is_auto_renew.is_some_and(|v| v != 0 && v != 1) {
        return Err(ApiError::AutoRenew);
    }
    Ok(())
}

/// The agent's `CreateServer` of a server with new phones: one per slot of
/// the flavor, named `<server_name>-0001` on.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_server(
    server_id: &str,
    server_name: &str,
    flavor: cph_agent::protocol::PhoneFlavor,
    image: &ImageRef,
    ports: &[PortSpec],
    band_width_size: u32,
    public_key: Option<String>,
    property: &BTreeMap<String, String>,
) -> CreateServer {
    let phones = (0..flavor.phone_capacity)
        .map(|slot| PhoneSpec {
            phone_id: new_id(),
            phone_name: format!("{server_name}-{:04}", slot + 1),
            slot,
            property: property.clone(),
        })
        .collect();
    CreateServer {
        server_id: server_id.to_string(),
        server_name: server_name.to_string(),
        flavor,
        image: image.clone(),
        ports: ports.to_vec(),
        band_width_size,
        public_key,
        phones,
        share_filesystems: Vec::new(),
    }
}

/// The (id, name) of each phone of `req`, in slot order.
pub(super) fn phone_names(req: &CreateServer) -> Vec<(String, String)> {
    req.phones
        .iter()
        .map(|p| (p.phone_id.clone(), p.phone_name.clone()))
        .collect()
}

/// Network version of a purchase endpoint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V1,
    V2,
    V21,
}

/// The bandwidth of a purchase: one the project has, named by id, or one
/// bought with the servers.
struct BandwidthChoice {
    size: u32,
    /// Empty when the purchase named none (each server's own bandwidth).
    id: String,
    /// Share type and charge mode of a bandwidth bought with the servers.
    new: Option<(i32, i32)>,
}

fn bandwidth_of(
    st: &Shared,
    project_id: &str,
    bw: Option<&BandWidthBody>,
) -> Result<BandwidthChoice, ApiError> {
    let Some(bw) = bw else {
        return Ok(BandwidthChoice {
            size: BANDWIDTH_DEDICATED,
            id: String::new(),
            new: None,
        });
    };
    if let Some(id) = bw.band_width_id.as_deref().filter(|s| !s.is_empty()) {
        let f = st
            .store
            .bandwidth(project_id, id)?
            .ok_or(ApiError::BandWidthId)?;
        return Ok(BandwidthChoice {
            size: f.band_width_size,
            id: id.to_string(),
            new: None,
        });
    }
    // A dedicated bandwidth is 300 Mbit/s unless a size is given (1 to
    // 2,000); a shared one needs its size (5 to 2,000); both in the
    // reference's increments.
    let (given, min) = match bw.band_width_share_type {
        Some(0) => (bw.band_width_size.or(Some(BANDWIDTH_DEDICATED.into())), 1),
        Some(1) => (bw.band_width_size, BANDWIDTH_MIN),
        _ => return Err(ApiError::BandWidthShareType),
    };
    let size = given
        .filter(|&s| super::misc::bandwidth_step(s, min))
        .ok_or(ApiError::BandWidthSize)? as u32;
    if bw.band_width_charge_mode.is_some_and(|m| m != 0 && m != 1) {
        return Err(ApiError::BandWidth);
    }
    Ok(BandwidthChoice {
        size,
        id: new_id(),
        new: Some((
            bw.band_width_share_type.unwrap_or(0),
            bw.band_width_charge_mode.unwrap_or(0),
        )),
    })
}

/// A checked purchase of any version: what each of its servers is made of.
struct Purchase<'a> {
    flavor: Flavor,
    server_name: &'a str,
    count: i64,
    server_model_name: String,
    /// Empty for a BMS without phones (v2.1).
    phone_model_name: String,
    /// The phones' flavor (for a BMS, one of no phones).
    agent_flavor: cph_agent::protocol::PhoneFlavor,
    image: ImageRef,
    ports: Vec<PortSpec>,
    property: BTreeMap<String, String>,
    public_key: Option<String>,
    keypair_name: String,
    vpc_id: String,
    subnet_cidr: Option<String>,
    availability_zone: String,
    bandwidth: BandwidthChoice,
}

/// What every purchase checks first: the name, the count and the server
/// model, which it returns.
fn ordered_model<'a>(
    st: &'a Shared,
    server_name: &str,
    count: i64,
    server_model_name: &str,
) -> Result<&'a ServerModel, ApiError> {
    validate::name(server_name, SERVER_NAME_MAX).map_err(|_| ApiError::ServerName)?;
    if !(1..=MAX_COUNT as i64).contains(&count) {
        return Err(ApiError::Count);
    }
    st.catalog
        .server_model(server_model_name)
        .ok_or(ApiError::ServerModelName)
}

async fn buy(st: Shared, c: Caller, b: BuyBody, flavor: Flavor) -> ApiResult {
    let sm = ordered_model(&st, &b.server_name, b.count, &b.server_model_name)?;
    let pm = st
        .catalog
        .phone_model(&b.phone_model_name)
        .filter(|m| m.server_model_name == sm.server_model_name && m.status == 1)
        .ok_or(ApiError::PhoneModelName)?;
    let usable =
        super::images::usable(&st, &c.project_id, &b.image_id)?.ok_or(ApiError::ImageId)?;
    usable.check_model(pm)?;
    let ports = validate_ports(b.ports.as_deref().unwrap_or(&[]))?;
    validate_extend(b.extend_param.as_ref())?;
    if flavor == Flavor::V1 && b.band_width.is_none() {
        return Err(ApiError::BandWidth.into());
    }
    let bandwidth = bandwidth_of(&st, &c.project_id, b.band_width.as_ref())?;
    let property = match b.phone_property.as_deref() {
        Some(p) => validate::property(p)?,
        None => BTreeMap::new(),
    };
    if let Some(cidr) = &b.subnet_cidr {
        if !cidr.contains('/') {
            return Err(ApiError::Field("subnet_cidr").into());
        }
    }
    let public_key = match b.keypair_name.as_deref() {
        Some(k) if !k.is_empty() => Some(
            st.store
                .keypair(&c.project_id, k)?
                .ok_or_else(|| ApiError::KeypairNotFound(k.to_string()))?,
        ),
        _ => None,
    };
    let _ = &b.nics;
    place_order(
        &st,
        &c,
        Purchase {
            flavor,
            server_name: &b.server_name,
            count: b.count,
            server_model_name: sm.server_model_name.clone(),
            phone_model_name: pm.phone_model_name.clone(),
            agent_flavor: Catalog::agent_flavor(pm),
            image: usable.image,
            ports,
            property,
            public_key,
            keypair_name: b.keypair_name.clone().unwrap_or_default(),
            vpc_id: b.tenant_vpc_id.clone().unwrap_or_default(),
            subnet_cidr: b.subnet_cidr.clone(),
            availability_zone: b.availability_zone.clone().unwrap_or_default(),
            bandwidth,
        },
    )
}

/// Records the order's servers, each assigned a free host of the model in
/// one transaction, and the bandwidth bought with them; their agents are
/// sent the `CreateServer` jobs.
fn place_order(st: &Shared, c: &Caller, p: Purchase<'_>) -> ApiResult {
    let mut servers = Vec::new();
    for i in 0..p.count {
        let server_id = new_id();
        let server_name = format!("{}-{:04}", p.server_name, i + 1);
        let req = new_server(
            &server_id,
            &server_name,
            p.agent_flavor.clone(),
            &p.image,
            &p.ports,
            p.bandwidth.size,
            p.public_key.clone(),
            &p.property,
        );
        servers.push(NewServer {
            phones: phone_names(&req),
            server_id,
            server_name,
            create_request: serde_json::to_string(&req)
                .map_err(|e| ApiError::Internal(e.to_string()))?,
        });
    }
    let order_id = format!("CS{}", &new_id()[..15].to_uppercase());
    let product_id = format!("OFFI{}", &new_id()[..18]);
    let network_version = if p.flavor == Flavor::V1 { "v1" } else { "v2" };
    let order = Order {
        project_id: c.project_id.clone(),
        server_model_name: p.server_model_name.clone(),
        phone_model_name: p.phone_model_name.clone(),
        image_id: p.image.image_id.clone(),
        keypair_name: p.keypair_name.clone(),
        network_version: network_version.into(),
        order_id: order_id.clone(),
        product_id: product_id.clone(),
        vpc_id: p.vpc_id.clone(),
        subnet_id: String::new(),
        vpc_cidr: "172.31.0.0/16".into(),
        subnet_cidr: p
            .subnet_cidr
            .clone()
            .unwrap_or_else(|| "172.31.0.0/24".into()),
        availability_zone: p.availability_zone.clone(),
        ports: serde_json::to_string(&p.ports).map_err(|e| ApiError::Internal(e.to_string()))?,
        band_width_id: p.bandwidth.id.clone(),
        property: serde_json::to_string(&p.property)
            .map_err(|e| ApiError::Internal(e.to_string()))?,
        servers,
        new_bandwidth: p.bandwidth.new.map(|(share_type, charge_mode)| {
            let now = crate::store::now_string();
            crate::store::Bandwidth {
                band_width_id: p.bandwidth.id.clone(),
                project_id: c.project_id.clone(),
                band_width_name: format!("{}-bandwidth", p.server_name),
                band_width_size: p.bandwidth.size,
                band_width_share_type: share_type,
                band_width_charge_mode: charge_mode,
                create_time: now.clone(),
                update_time: now,
            }
        }),
    };
    let Some(created) = st.store.assign_servers(&order)? else {
        return Err(match p.flavor {
            Flavor::V1 => ApiError::Capacity(p.server_model_name.clone()),
            Flavor::V2 | Flavor::V21 => ApiError::InsufficientBms(p.server_model_name.clone()),
        }
        .into());
    };
    st.dispatcher.kick();
    tracing::info!(order_id = %order_id, count = created.len(), "servers assigned");
    Ok(Reply::ok(json!({
        "order_id": order_id,
        "product_id": product_id,
        "server_ids": created.iter().map(|s| s.server_id.clone()).collect::<Vec<_>>(),
    })))
}

pub async fn buy_v1(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<BuyBody>,
) -> ApiResult {
    buy(st, c, b, Flavor::V1).await
}

pub async fn buy_v2(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<BuyBody>,
) -> ApiResult {
    buy(st, c, b, Flavor::V2).await
}

/// `public_ip` of a v2.1 purchase.
#[derive(Deserialize)]
pub struct BmsPublicIp {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    count: Option<i64>,
    #[serde(default)]
    band_width: Option<BandWidthBody>,
}

/// `data_volume` of a v2.1 purchase.
#[derive(Deserialize)]
pub struct DataVolume {
    #[serde(default)]
    volume_type: Option<String>,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    count: Option<i64>,
}

/// The purchase body of v2.1: a cloud phone BMS, a server with no phones.
#[derive(Deserialize)]
pub struct BmsBody {
    server_name: String,
    server_model_name: String,
    count: i64,
    #[serde(default)]
    order_param: Option<ExtendParam>,
    #[serde(default)]
    nics: Option<Vec<Value>>,
    #[serde(default)]
    public_ip: Option<BmsPublicIp>,
    #[serde(default)]
    availability_zone: Option<String>,
    #[serde(default)]
    data_volume: Option<DataVolume>,
    #[serde(default)]
    keypair_name: Option<String>,
    #[serde(default)]
    enterprise_project_id: Option<String>,
    #[serde(default)]
    image_id: Option<String>,
}

/// The EIP types of the reference.
const EIP_TYPES: [&str; 4] = ["5_telcom", "5_union", "5_bgp", "5_sbgp"];

/// `POST /v2.1/{project_id}/cloud-phone/servers`: cloud phone BMSs, hosts
/// of the model with no phones, reached over SSH with the keypair (the
/// host's `authorized_keys`). Their `image_id`, a host image, and data
/// volume are recorded as given; the hosts keep the system they run.
pub async fn buy_v21(
    State(st): State<Shared>,
    Extension(c): Extension<Caller>,
    Json(b): Json<BmsBody>,
) -> ApiResult {
    let sm = ordered_model(&st, &b.server_name, b.count, &b.server_model_name)?;
    validate_extend(b.order_param.as_ref())?;
    let nics = b.nics.as_deref().unwrap_or_default();
    let subnet = |n: &Value| n["subnet_id"].as_str().is_some_and(|s| !s.is_empty());
    if nics.is_empty() || !nics.iter().all(subnet) {
        return Err(ApiError::Field("nics").into());
    }
    let ip = b.public_ip.as_ref().ok_or(ApiError::Field("public_ip"))?;
    let ip_ok = ip.ids.as_ref().is_none_or(|ids| ids.len() <= 1)
        && ip.kind.as_deref().is_none_or(|t| EIP_TYPES.contains(&t))
        && ip.count.is_none_or(|n| n == 0 || n == 1);
    if !ip_ok {
        return Err(ApiError::Field("public_ip").into());
    }
    let bw = ip.band_width.as_ref().ok_or(ApiError::BandWidth)?;
    if bw.band_width_charge_mode.is_none() {
        return Err(ApiError::BandWidth.into());
    }
    let bandwidth = bandwidth_of(&st, &c.project_id, Some(bw))?;
    if let Some(v) = &b.data_volume {
        let ok = v
            .volume_type
            .as_deref()
            .is_some_and(|t| t == "SSD" || t == "GPSSD")
            && v.size
                .is_some_and(|s| (1..=VOLUME_MAX_GIB as i64).contains(&s))
            && v.count.is_none_or(|n| n >= 1);
        if !ok {
            return Err(ApiError::Field("data_volume").into());
        }
    }
    let image_id = b.image_id.clone().unwrap_or_default();
    if image_id.len() > 36 {
        return Err(ApiError::ImageId.into());
    }
    let keypair_name = b.keypair_name.clone().unwrap_or_default();
    if keypair_name.is_empty() {
        return Err(ApiError::KeypairEmpty.into());
    }
    let public_key = st
        .store
        .keypair(&c.project_id, &keypair_name)?
        .ok_or_else(|| ApiError::KeypairNotFound(keypair_name.clone()))?;
    let _ = &b.enterprise_project_id;
    place_order(
        &st,
        &c,
        Purchase {
            flavor: Flavor::V21,
            server_name: &b.server_name,
            count: b.count,
            server_model_name: sm.server_model_name.clone(),
            phone_model_name: String::new(),
            agent_flavor: cph_agent::protocol::PhoneFlavor {
                flavor_id: String::new(),
                vcpus: 0,
                memory_mb: 0,
                disk_gb: 0,
                phone_capacity: 0,
                core_bind_strategy: String::new(),
                extend_spec: json!({}),
            },
            image: ImageRef {
                image_id,
                url: String::new(),
            },
            ports: Vec::new(),
            property: BTreeMap::new(),
            public_key: Some(public_key),
            keypair_name,
            vpc_id: String::new(),
            subnet_cidr: None,
            availability_zone: b.availability_zone.clone().unwrap_or_default(),
            bandwidth,
        },
    )
}
