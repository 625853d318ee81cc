//! `cph-runtime`: everything of a cloud phone host that touches the kernel.
//!
//! The crate knows nothing of tenants, projects or HTTP. It owns:
//! - `container`: phone containers (namespaces, cgroups, supervision, exec);
//! - `placement`: host topology and the core-binding strategies of phone flavors;
//! - `storage`: the disk layout (thinpool volumes, sharepool, images);
//! - `net`: phone networking (bridge, veth, nftables port maps, tc bandwidth).
//!
//! Pure planning is kept apart from applying it, so plans are tested without
//! root and appliers are tested for real, as root.

pub mod archive;
pub mod container;
pub mod net;
pub mod placement;
pub mod privilege;
pub mod storage;
