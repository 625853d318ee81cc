//! The catalog: server flavors, phone flavors and phone images.
//!
//! Defaults come from the reference's examples plus a development flavor
//! that fits a 2-CPU machine; operators add entries with `catalog*.json`
//! files in the data dir (`{"server_models":[...],"phone_models":[...],"phone_images":[...]}`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The development server flavor.
pub const DEV_SERVER_MODEL: &str = "physical.dev.local";
/// The development phone flavor.
pub const DEV_PHONE_MODEL: &str = "dev.cp.c1.m512";
/// The development server's second flavor: the same phones with more
/// memory, for trying `change-server-model` on one machine.
pub const DEV_PHONE_MODEL_M768: &str = "dev.cp.c1.m768";
/// Default id of the test phone image.
pub const TEST_IMAGE_ID: &str = "cph0test0image00000000000000001";

/// Catalog loading failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid catalog file {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
}

/// A server flavor (`server_models[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerModel {
    pub server_model_name: String,
    pub server_type: String,
    pub cpu: u32,
    pub memory: u32,
    pub extend_spec: Value,
    #[serde(default)]
    pub product_type: i32,
}

/// A phone flavor (`phone_models[]`); `extend_spec` is a JSON object kept
/// as a value and rendered as a string on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneModel {
    pub server_model_name: String,
    pub phone_model_name: String,
    pub status: i32,
    pub cpu: f64,
    pub memory: u64,
    pub disk: u64,
    pub resolution: String,
    pub extend_spec: Value,
    pub spec_code: String,
    pub phone_capacity: u32,
    pub image_label: String,
    #[serde(default)]
    pub product_type: i32,
}

/// A phone image (`phone_images[]`) with where its rootfs archive is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhoneImage {
    pub image_name: String,
    pub os_type: String,
    pub os_name: String,
    pub image_id: String,
    pub is_public: i32,
    pub image_label: String,
    /// `file:///...` or `obs://bucket/key`; never on the wire.
    #[serde(default)]
    pub url: String,
    /// Owning project of a private image.
    #[serde(default)]
    pub project_id: Option<String>,
}

/// The whole catalog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    #[serde(default)]
    pub server_models: Vec<ServerModel>,
    #[serde(default)]
    pub phone_models: Vec<PhoneModel>,
    #[serde(default)]
    pub phone_images: Vec<PhoneImage>,
}

impl Catalog {
    /// The shipped defaults; `test_image_url` is where the test image is.
    pub fn defaults(test_image_id: &str, test_image_url: &str) -> Self {
        let server_models = vec![
            ServerModel {
                server_model_name: "physical.rx1.xlarge".into(),
                server_type: "Hi1616".into(),
                cpu: 64,
                memory: 256,
                extend_spec: json!({"cpu": "Hi1616(2*32Core*2.4GHz)", "memory": "DDR4 RAM",
                    "disk": "2*1.2T SAS + 800G SSD", "network_interface": "2 x 2*10GE",
                    "gpu": "3*WX5100", "bms_flavor": "physical.rg1.xlarge.cph.ondemand",
                    "gpu_count": 3, "numa_count": 4}),
                product_type: 0,
            },
            ServerModel {
                server_model_name: DEV_SERVER_MODEL.into(),
                server_type: "generic".into(),
                cpu: 2,
                memory: 2,
                extend_spec: json!({"cpu": "2 vCPU", "memory": "RAM", "disk": "local",
                    "network_interface": "1 x virtual", "gpu": "none", "bms_flavor": "local",
                    "gpu_count": 0, "numa_count": 1}),
                product_type: 0,
            },
        ];
        // The development server's flavors: two phones of 1 CPU, the
        // memory theirs.
        let dev_phone = |name: &str, memory: u64| PhoneModel {
            server_model_name: DEV_SERVER_MODEL.into(),
            phone_model_name: name.into(),
            status: 1,
            cpu: 1.0,
            memory,
            disk: 2,
            resolution: "720x1280".into(),
            extend_spec: json!({"eip_count": 1, "vip_count": 1, "emulator_type": 1,
                "thinpool_size_g": 4, "sharepool_size_g": 2, "max_share_disk_size_g": 1,
                "encode_server_spec": {"cpu": 1, "memory": 256, "disk": 1,
                    "image_id": "coderserver_v2.5", "port_num": 2},
                "core_bind_strategy": "dev_small"}),
            spec_code: name.into(),
            phone_capacity: 2,
            image_label: "cloud_phone".into(),
            product_type: 0,
        };
        let phone_models = vec![
            PhoneModel {
                server_model_name: "physical.rx1.xlarge".into(),
                phone_model_name: "rx1.cp.c60.d10.e1v1".into(),
                status: 1,
                cpu: 2.0,
                memory: 3584,
                disk: 10,
                resolution: "720x1280".into(),
                extend_spec: json!({"eip_count": 1, "vip_count": 1, "emulator_type": 1,
                    "thinpool_size_g": 70, "sharepool_size_g": 650, "max_share_disk_size_g": 50,
                    "encode_server_spec": {"cpu": 2, "memory": 14448, "disk": 10,
                        "image_id": "coderserver_v2.5", "port_num": 0},
                    "core_bind_strategy": "common_hosted_c60"}),
                spec_code: "rx1.cp.c60.d10.e1v1".into(),
                phone_capacity: 60,
                image_label: "cloud_phone".into(),
                product_type: 0,
            },
            PhoneModel {
                server_model_name: "physical.rx1.xlarge".into(),
                phone_model_name: "rx1.cp.c60.d32.e1v1.qemu".into(),
                status: 1,
                cpu: 2.0,
                memory: 3072,
                disk: 32,
                resolution: "540x960".into(),
                extend_spec: json!({"eip_count": 1, "vip_count": 1, "emulator_type": 0,
                    "bms_image_id": "72460777-7fcb-4cae-8bb5-62d93be86bd7",
                    "core_bind_strategy": "lxc_qemu_common_hosted_c60", "sd_disk": 1}),
                spec_code: "rx1.cp.c60.d32.e1v1.qemu".into(),
                phone_capacity: 60,
                image_label: "qemu_phone".into(),
                product_type: 0,
            },
            dev_phone(DEV_PHONE_MODEL, 512),
            dev_phone(DEV_PHONE_MODEL_M768, 768),
        ];
        let img = |name: &str, os: &str, label: &str, id: &str| PhoneImage {
            image_name: name.into(),
            os_type: "aosp".into(),
            os_name: os.into(),
            image_id: id.into(),
            is_public: 1,
            image_label: label.into(),
            url: String::new(),
            project_id: None,
        };
        let mut test = img("cph-test-image", "AOSP-test", "cloud_phone", test_image_id);
        test.url = test_image_url.to_string();
        let phone_images = vec![
            img(
                "AOSP",
                "AOSP7.1.1",
                "cloud_game",
                "20032420200401a60b0003a99684b8ea",
            ),
            img(
                "AOSP",
                "AOSP7.1.1",
                "cloud_phone",
                "20032120200330a20b000eae5b8c01e6",
            ),
            img(
                "AOSP",
                "AOSP7.0.0",
                "qemu_phone",
                "be4d231e44d2a4ccf612660a473fe1e3",
            ),
            test,
        ];
        Self {
            server_models,
            phone_models,
            phone_images,
        }
    }

    /// Adds (or replaces by name/id) the entries of every `catalog*.json`
    /// file in `dir`, in name order.
    pub fn extend_from_dir(&mut self, dir: &Path) -> Result<(), CatalogError> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("catalog") && n.ends_with(".json"))
            })
            .collect();
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| CatalogError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let extra: Catalog =
                serde_json::from_str(&text).map_err(|source| CatalogError::Parse {
                    path: path.display().to_string(),
                    source,
                })?;
            self.merge(extra);
        }
        Ok(())
    }

    fn merge(&mut self, extra: Catalog) {
        for m in extra.server_models {
            self.server_models
                .retain(|x| x.server_model_name != m.server_model_name);
            self.server_models.push(m);
        }
        for m in extra.phone_models {
            self.phone_models
                .retain(|x| x.phone_model_name != m.phone_model_name);
            self.phone_models.push(m);
        }
        for m in extra.phone_images {
            self.phone_images.retain(|x| x.image_id != m.image_id);
            self.phone_images.push(m);
        }
    }

    pub fn server_model(&self, name: &str) -> Option<&ServerModel> {
        self.server_models
            .iter()
            .find(|m| m.server_model_name == name)
    }

    pub fn phone_model(&self, name: &str) -> Option<&PhoneModel> {
        self.phone_models
            .iter()
            .find(|m| m.phone_model_name == name)
    }

    /// An image visible to a project (public, or private to it).
    pub fn image(&self, project_id: &str, id: &str) -> Option<&PhoneImage> {
        self.phone_images.iter().find(|i| {
            i.image_id == id && (i.is_public == 1 || i.project_id.as_deref() == Some(project_id))
        })
    }

    /// The agent protocol's view of a phone flavor.
    pub fn agent_flavor(m: &PhoneModel) -> cph_agent::protocol::PhoneFlavor {
        cph_agent::protocol::PhoneFlavor {
            flavor_id: m.phone_model_name.clone(),
            vcpus: m.cpu.ceil() as u32,
            memory_mb: m.memory,
            disk_gb: m.disk,
            phone_capacity: m.phone_capacity,
            core_bind_strategy: m
                .extend_spec
                .get("core_bind_strategy")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            extend_spec: m.extend_spec.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_extend_and_replace_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("catalog-extra.json"),
            r#"{"phone_images":[{"image_name":"mine","os_type":"aosp","os_name":"A","image_id":"img1","is_public":2,"image_label":"cloud_phone","url":"obs://b/k","project_id":"p"}]}"#,
        )
        .expect("write");
        let mut c = Catalog::defaults(TEST_IMAGE_ID, "file:///x.tar.gz");
        c.extend_from_dir(dir.path()).expect("extend");
        assert!(c.image("p", "img1").is_some());
        assert!(c.image("other", "img1").is_none());
        assert_eq!(
            c.phone_model(DEV_PHONE_MODEL).expect("dev").phone_capacity,
            2
        );
    }
}
