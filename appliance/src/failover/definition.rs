//! Machine definitions of a failover: for each machine of the group, what a hypervisor or an
//! orchestration script needs to start it at the target site — its target settings (resource
//! group, availability set, NICs through the network mapping, or the test network for a test
//! failover) and its disks (the failover's NBD exports, the RBD clones on RBD target storage, or
//! the materialised images). Written as
//! JSON (for scripts) and as a libvirt domain XML (`virsh define`), both from one
//! [`MachineDefinition`] so they never disagree.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::config::MachineSettings;

/// Memory and vCPUs are not part of a machine's replicated settings (Ferry sees disks, not the
/// hypervisor's machine config): the XML carries these defaults, and says so in a comment.
pub const DOMAIN_MEMORY_MIB_DEFAULT: u64 = 1024;
pub const DOMAIN_VCPUS_DEFAULT: u32 = 1;

/// One NIC of a failed-over machine, after the network mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicDefinition {
    pub network: String,
    pub subnet: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

/// One disk of a failed-over machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDefinition {
    pub name: String,
    pub size_bytes: u64,
    /// `<machine>/<disk>` on `socket`.
    pub export_name: String,
    pub socket: String,
    pub uri: String,
    /// The materialised raw image, when the failover wrote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The RBD clone holding the disk, on RBD target storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbd: Option<RbdDiskDefinition>,
}

/// A disk as an RBD image a hypervisor opens itself (libvirt `<source protocol='rbd'>`, qemu
/// `rbd:` URI).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdDiskDefinition {
    pub pool: String,
    pub image: String,
    /// The monitors as (host, port); no port: the client's default.
    pub monitors: Vec<RbdMonitor>,
    /// The cephx user (without `client.`).
    pub user: String,
    /// The usage name of the libvirt secret holding the user's key.
    pub secret_usage: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RbdMonitor {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// The recovery point a definition was made from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointReference {
    pub id: u64,
    pub time_unix_ms: u64,
}

/// A failed-over machine, as written to `<machine>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDefinition {
    pub name: String,
    pub group: String,
    /// The source appliance the machine was replicated from.
    pub source_appliance: String,
    pub test: bool,
    pub recovery_point: PointReference,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_set: Option<String>,
    pub nics: Vec<NicDefinition>,
    pub disks: Vec<DiskDefinition>,
}

impl MachineDefinition {
    /// The definition of a machine from its stored target settings. A test failover puts every
    /// NIC in the settings' test network (when one is mapped) so the copy cannot meet production.
    pub fn new(
        group: &str,
        source_appliance: &str,
        target: &MachineSettings,
        test: bool,
        recovery_point: PointReference,
        disks: Vec<DiskDefinition>,
    ) -> Self {
        let nics = target
            .nics
            .iter()
            .map(|nic| NicDefinition {
                network: match (&target.test_network, test) {
                    (Some(test_network), true) => test_network.clone(),
                    _ => nic.network.clone(),
                },
                subnet: nic.subnet.clone(),
                ip: nic.ip.map(|ip| ip.to_string()),
            })
            .collect();
        Self {
            name: target.name.clone(),
            group: group.to_string(),
            source_appliance: source_appliance.to_string(),
            test,
            recovery_point,
            resource_group: target.resource_group.clone(),
            availability_set: target.availability_set.clone(),
            nics,
            disks,
        }
    }

    /// The libvirt domain name: a test copy gets a suffix so it can run beside production.
    pub fn domain_name(&self) -> String {
        if self.test {
            format!("{}-test", self.name)
        } else {
            self.name.clone()
        }
    }

    /// A libvirt domain XML (KVM, virtio disks and NICs). Disks are the materialised images when
    /// present, else the RBD clones (on RBD target storage), else the NBD exports over their
    /// unix sockets; placement settings libvirt has no element for travel in `<metadata>`.
    pub fn libvirt_xml(&self) -> String {
        let mut xml = String::new();
        let _ = writeln!(xml, "<domain type='kvm'>");
        let _ = writeln!(xml, "  <name>{}</name>", escape(&self.domain_name()));
        let _ = writeln!(
            xml,
            "  <!-- written by Ferry's failover of group {} at recovery point {}; memory and vCPUs are defaults: Ferry replicates disks, not the hypervisor's machine config -->",
            escape_comment(&self.group),
            self.recovery_point.id
        );
        let _ = writeln!(xml, "  <metadata>");
        let _ = writeln!(
            xml,
            "    <ferry:machine xmlns:ferry='https://github.com/ferry-dr/ferry/failover/1'>"
        );
        let _ = writeln!(
            xml,
            "      <ferry:group>{}</ferry:group>",
            escape(&self.group)
        );
        let _ = writeln!(
            xml,
            "      <ferry:source-appliance>{}</ferry:source-appliance>",
            escape(&self.source_appliance)
        );
        let _ = writeln!(
            xml,
            "      <ferry:recovery-point id='{}' time-unix-ms='{}'/>",
            self.recovery_point.id, self.recovery_point.time_unix_ms
        );
        let _ = writeln!(xml, "      <ferry:test>{}</ferry:test>", self.test);
        if let Some(resource_group) = &self.resource_group {
            let _ = writeln!(
                xml,
                "      <ferry:resource-group>{}</ferry:resource-group>",
                escape(resource_group)
            );
        }
        if let Some(availability_set) = &self.availability_set {
            let _ = writeln!(
                xml,
                "      <ferry:availability-set>{}</ferry:availability-set>",
                escape(availability_set)
            );
        }
        for nic in &self.nics {
            let _ = write!(
                xml,
                "      <ferry:nic network='{}' subnet='{}'",
                escape(&nic.network),
                escape(&nic.subnet)
            );
            if let Some(ip) = &nic.ip {
                let _ = write!(xml, " ip='{}'", escape(ip));
            }
            let _ = writeln!(xml, "/>");
        }
        let _ = writeln!(xml, "    </ferry:machine>");
        let _ = writeln!(xml, "  </metadata>");
        let _ = writeln!(
            xml,
            "  <memory unit='MiB'>{DOMAIN_MEMORY_MIB_DEFAULT}</memory>"
        );
        let _ = writeln!(xml, "  <vcpu>{DOMAIN_VCPUS_DEFAULT}</vcpu>");
        let _ = writeln!(xml, "  <os>");
        let _ = writeln!(xml, "    <type arch='x86_64'>hvm</type>");
        let _ = writeln!(xml, "    <boot dev='hd'/>");
        let _ = writeln!(xml, "  </os>");
        let _ = writeln!(xml, "  <devices>");
        for (index, disk) in self.disks.iter().enumerate() {
            let target_dev = virtio_dev(index);
            match (&disk.image, &disk.rbd) {
                (Some(image), _) => {
                    let _ = writeln!(xml, "    <disk type='file' device='disk'>");
                    let _ = writeln!(xml, "      <driver name='qemu' type='raw'/>");
                    let _ = writeln!(xml, "      <source file='{}'/>", escape(image));
                }
                (None, Some(rbd)) => {
                    let _ = writeln!(xml, "    <disk type='network' device='disk'>");
                    let _ = writeln!(
                        xml,
                        "      <driver name='qemu' type='raw' cache='writeback'/>"
                    );
                    let _ = writeln!(xml, "      <auth username='{}'>", escape(&rbd.user));
                    let _ = writeln!(
                        xml,
                        "        <secret type='ceph' usage='{}'/>",
                        escape(&rbd.secret_usage)
                    );
                    let _ = writeln!(xml, "      </auth>");
                    let _ = writeln!(
                        xml,
                        "      <source protocol='rbd' name='{}/{}'>",
                        escape(&rbd.pool),
                        escape(&rbd.image)
                    );
                    for monitor in &rbd.monitors {
                        let _ = write!(xml, "        <host name='{}'", escape(&monitor.host));
                        if let Some(port) = monitor.port {
                            let _ = write!(xml, " port='{port}'");
                        }
                        let _ = writeln!(xml, "/>");
                    }
                    let _ = writeln!(xml, "      </source>");
                }
                (None, None) => {
                    let _ = writeln!(xml, "    <disk type='network' device='disk'>");
                    let _ = writeln!(xml, "      <driver name='qemu' type='raw'/>");
                    let _ = writeln!(
                        xml,
                        "      <source protocol='nbd' name='{}'>",
                        escape(&disk.export_name)
                    );
                    let _ = writeln!(
                        xml,
                        "        <host transport='unix' socket='{}'/>",
                        escape(&disk.socket)
                    );
                    let _ = writeln!(xml, "      </source>");
                }
            }
            let _ = writeln!(xml, "      <target dev='{target_dev}' bus='virtio'/>");
            let _ = writeln!(xml, "      <serial>{}</serial>", escape(&disk.name));
            let _ = writeln!(xml, "    </disk>");
        }
        for nic in &self.nics {
            let _ = writeln!(xml, "    <interface type='network'>");
            let _ = writeln!(xml, "      <source network='{}'/>", escape(&nic.network));
            let _ = writeln!(xml, "      <model type='virtio'/>");
            let _ = writeln!(xml, "    </interface>");
        }
        let _ = writeln!(xml, "    <console type='pty'/>");
        let _ = writeln!(xml, "  </devices>");
        let _ = writeln!(xml, "</domain>");
        xml
    }
}

/// `vda`, `vdb`, … `vdz`, `vdaa`, …
fn virtio_dev(index: usize) -> String {
    let mut suffix = String::new();
    let mut n = index;
    loop {
        suffix.insert(0, (b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("vd{suffix}")
}

/// XML text and attribute escaping (attributes are single-quoted here).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// A comment may not contain `--`.
fn escape_comment(text: &str) -> String {
    escape(text).replace("--", "- -")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NicConfig;

    fn settings() -> MachineSettings {
        MachineSettings {
            name: "web-1".into(),
            resource_group: Some("rg-dr".into()),
            availability_set: Some("web-dr".into()),
            nics: vec![NicConfig {
                network: "dr-prod".into(),
                subnet: "front".into(),
                ip: Some("10.1.0.4".parse().unwrap()),
            }],
            test_network: Some("dr-test".into()),
        }
    }

    fn disk(image: Option<&str>) -> DiskDefinition {
        DiskDefinition {
            name: "os".into(),
            size_bytes: 1 << 30,
            export_name: "web-1/os".into(),
            socket: "/var/lib/ferry/failover/app/web-1-os.sock".into(),
            uri: "nbd+unix:///web-1/os?socket=/var/lib/ferry/failover/app/web-1-os.sock".into(),
            image: image.map(str::to_string),
            rbd: None,
        }
    }

    fn point() -> PointReference {
        PointReference {
            id: 7,
            time_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_failover_keeps_the_mapped_network_and_a_test_failover_uses_the_test_network() {
        let failover = MachineDefinition::new(
            "app",
            "site-a",
            &settings(),
            false,
            point(),
            vec![disk(None)],
        );
        assert_eq!(failover.nics[0].network, "dr-prod");
        assert_eq!(failover.domain_name(), "web-1");
        let test = MachineDefinition::new(
            "app",
            "site-a",
            &settings(),
            true,
            point(),
            vec![disk(None)],
        );
        assert_eq!(test.nics[0].network, "dr-test");
        assert_eq!(test.nics[0].subnet, "front");
        assert_eq!(test.nics[0].ip.as_deref(), Some("10.1.0.4"));
        assert_eq!(test.domain_name(), "web-1-test");
        // Without a test network the test copy keeps the mapped one.
        let mut no_test_network = settings();
        no_test_network.test_network = None;
        let test = MachineDefinition::new("app", "site-a", &no_test_network, true, point(), vec![]);
        assert_eq!(test.nics[0].network, "dr-prod");
    }

    #[test]
    fn the_domain_xml_names_the_export_or_the_image_and_escapes_names() {
        let mut settings = settings();
        settings.resource_group = Some("r&d <west>".into());
        let exported =
            MachineDefinition::new("app", "site-a", &settings, false, point(), vec![disk(None)]);
        let xml = exported.libvirt_xml();
        assert!(
            xml.contains("<source protocol='nbd' name='web-1/os'>"),
            "{xml}"
        );
        assert!(xml.contains(
            "<host transport='unix' socket='/var/lib/ferry/failover/app/web-1-os.sock'/>"
        ));
        assert!(xml.contains("<target dev='vda' bus='virtio'/>"));
        assert!(xml.contains("<source network='dr-prod'/>"));
        assert!(xml.contains("r&amp;d &lt;west&gt;"));
        assert!(!xml.contains("r&d"));
        let materialised = MachineDefinition::new(
            "app",
            "site-a",
            &settings,
            false,
            point(),
            vec![disk(Some("/out/web-1/os.raw"))],
        );
        let xml = materialised.libvirt_xml();
        assert!(xml.contains("<source file='/out/web-1/os.raw'/>"), "{xml}");
        assert!(!xml.contains("protocol='nbd'"));
    }

    #[test]
    fn an_rbd_disk_is_a_network_disk_with_its_monitors_and_auth() {
        let mut on_rbd = disk(None);
        on_rbd.rbd = Some(RbdDiskDefinition {
            pool: "dr".into(),
            image: "ferry.site-a+web-1+os+failover+app".into(),
            monitors: vec![
                RbdMonitor {
                    host: "10.0.0.1".into(),
                    port: Some(3300),
                },
                RbdMonitor {
                    host: "mon2".into(),
                    port: None,
                },
            ],
            user: "ferry".into(),
            secret_usage: "client.ferry secret".into(),
        });
        let definition =
            MachineDefinition::new("app", "site-a", &settings(), true, point(), vec![on_rbd]);
        let xml = definition.libvirt_xml();
        assert!(
            xml.contains("<source protocol='rbd' name='dr/ferry.site-a+web-1+os+failover+app'>"),
            "{xml}"
        );
        assert!(xml.contains("<host name='10.0.0.1' port='3300'/>"), "{xml}");
        assert!(xml.contains("<host name='mon2'/>"), "{xml}");
        assert!(xml.contains("<auth username='ferry'>"), "{xml}");
        assert!(
            xml.contains("<secret type='ceph' usage='client.ferry secret'/>"),
            "{xml}"
        );
        assert!(!xml.contains("protocol='nbd'"), "{xml}");
        let json = serde_json::to_string(&definition).unwrap();
        let back: MachineDefinition = serde_json::from_str(&json).unwrap();
        assert_eq!(back, definition);
    }

    #[test]
    fn virtio_device_names_continue_past_z() {
        assert_eq!(virtio_dev(0), "vda");
        assert_eq!(virtio_dev(25), "vdz");
        assert_eq!(virtio_dev(26), "vdaa");
        assert_eq!(virtio_dev(27), "vdab");
    }

    #[test]
    fn the_json_round_trips() {
        let definition = MachineDefinition::new(
            "app",
            "site-a",
            &settings(),
            false,
            point(),
            vec![disk(None)],
        );
        let json = serde_json::to_string_pretty(&definition).unwrap();
        let back: MachineDefinition = serde_json::from_str(&json).unwrap();
        assert_eq!(back, definition);
        assert!(json.contains("\"resource_group\": \"rg-dr\""));
    }
}
