//! Pure planning logic: names, addresses, and the text of every generated file
//! (dnsmasq configuration, iPXE script, QEMU command line, cluster configuration).
//!
//! Nothing here touches the system, so all of it is unit-tested.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Name of the bridge inside the lab namespace.
pub const BRIDGE: &str = "kdbr0";
/// Highest number of nodes in one lab (addresses .11 to .210 of the /24).
pub const MAX_NODES: usize = 200;

/// An IPv4 /24 subnet such as `10.77.0.0/24`; the host side is `.1`, node `i` is `.(10+i)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    octets: [u8; 3],
}

impl Subnet {
    /// The default lab subnet, `10.77.0.0/24`.
    pub const DEFAULT: Subnet = Subnet {
        octets: [10, 77, 0],
    };

    /// Lab identifier derived from the subnet: `77` for `10.77.0.0/24`, `a-b-c` otherwise.
    pub fn id(&self) -> String {
        let [a, b, c] = self.octets;
        if a == 10 && c == 0 {
            b.to_string()
        } else {
            format!("{a}-{b}-{c}")
        }
    }

    /// Name of the lab's network namespace: `kdlab-<id>`.
    pub fn netns(&self) -> String {
        format!("kdlab-{}", self.id())
    }

    /// The host (gateway, dnsmasq, HTTP, coordinator) address: `.1`.
    pub fn gateway(&self) -> Ipv4Addr {
        let [a, b, c] = self.octets;
        Ipv4Addr::new(a, b, c, 1)
    }

    /// The network address (`.0`).
    pub fn network(&self) -> Ipv4Addr {
        let [a, b, c] = self.octets;
        Ipv4Addr::new(a, b, c, 0)
    }

    /// Address of node `index` (1-based): `.(10 + index)`.
    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        let [a, b, c] = self.octets;
        // index <= MAX_NODES is checked by `LabPlan::new`.
        let last = u8::try_from(10 + index).unwrap_or(u8::MAX);
        Ipv4Addr::new(a, b, c, last)
    }

    /// MAC of node `index` (1-based): `52:54:00:<b>:<c>:<10+index>` in lowercase hex.
    pub fn node_mac(&self, index: usize) -> String {
        let [_, b, c] = self.octets;
        let last = u8::try_from(10 + index).unwrap_or(u8::MAX);
        format!("52:54:00:{b:02x}:{c:02x}:{last:02x}")
    }

    /// IPv6 ULA prefix used only for router advertisements (`fdXX:Y::`); see lab.md.
    pub fn ipv6_prefix(&self) -> String {
        let [_, b, c] = self.octets;
        format!("fd{b:02x}:{c:x}::")
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c] = self.octets;
        write!(f, "{a}.{b}.{c}.0/24")
    }
}

impl FromStr for Subnet {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Invalid(format!("subnet {s:?}: expected A.B.C.0/24"));
        let (addr, len) = s.split_once('/').unwrap_or((s, "24"));
        if len != "24" {
            return Err(bad());
        }
        let ip: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let [a, b, c, d] = ip.octets();
        if d != 0 {
            return Err(bad());
        }
        Ok(Subnet { octets: [a, b, c] })
    }
}

impl TryFrom<String> for Subnet {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// The identity of one node: name, MAC, address, tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// 1-based index.
    pub index: usize,
    /// `node<index>`.
    pub name: String,
    /// Lowercase colon-separated MAC.
    pub mac: String,
    /// Static DHCP address.
    pub ip: Ipv4Addr,
    /// Tap device inside the namespace: `tap<index>`.
    pub tap: String,
    /// Rack label (`rack1`, `rack2`, ...), `rack_size` nodes per rack.
    pub rack: String,
}

/// Compute the node identities of a lab.
pub fn nodes(subnet: &Subnet, count: usize, rack_size: usize) -> Result<Vec<NodePlan>, Error> {
    if count == 0 || count > MAX_NODES {
        return Err(Error::Invalid(format!(
            "node count {count}: expected 1..={MAX_NODES}"
        )));
    }
    let rack_size = rack_size.max(1);
    Ok((1..=count)
        .map(|i| NodePlan {
            index: i,
            name: format!("node{i}"),
            mac: subnet.node_mac(i),
            ip: subnet.node_ip(i),
            tap: format!("tap{i}"),
            rack: format!("rack{}", (i - 1) / rack_size + 1),
        })
        .collect())
}

/// iPXE's `${net0/mac:hexhyp}` form of a MAC: `52-54-00-4d-00-0b`. Per-node iPXE
/// profiles live at `<http_root>/nodes/<this>.ipxe`.
pub fn mac_hexhyp(mac: &str) -> String {
    mac.to_ascii_lowercase().replace(':', "-")
}

/// pxelinux's file name for an address: upper-case hex, e.g. `0A4D000B`.
pub fn ip_hex(ip: Ipv4Addr) -> String {
    ip.octets().iter().map(|o| format!("{o:02X}")).collect()
}

/// Text of the dnsmasq configuration (DHCP + TFTP, no DNS), per lab.md. A UEFI lab also
/// hands UEFI x86-64 PXE clients (client-arch 7 or 9) iPXE's EFI binary instead of
/// pxelinux; iPXE then asks again (option 175) and gets `boot.ipxe` like on BIOS. OVMF's
/// HTTP boot client (client-arch 16), which OVMF tries after PXE and before the disk, gets
/// a URL the lab's HTTP server answers 404 at once ([`NO_HTTP_BOOT`]): unanswered, it waits
/// ~30 s for an offer with a URL.
pub fn dnsmasq_conf(
    subnet: &Subnet,
    nodes: &[NodePlan],
    state_dir: &Path,
    http_port: u16,
    firmware: Firmware,
) -> String {
    let gw = subnet.gateway();
    let sd = state_dir.display();
    let mut s = String::new();
    s.push_str("# generated by kd-lab; never SIGHUP this dnsmasq\n");
    s.push_str("port=0\nno-resolv\nno-hosts\nuser=root\ngroup=root\n");
    s.push_str(&format!("interface={BRIDGE}\nbind-interfaces\n"));
    s.push_str(&format!("log-facility={sd}/dnsmasq.log\nlog-dhcp\n"));
    s.push_str(&format!("dhcp-leasefile={sd}/dnsmasq.leases\n"));
    s.push_str("dhcp-authoritative\n");
    s.push_str(&format!(
        "dhcp-range={},static,255.255.255.0,12h\n",
        subnet.network()
    ));
    for n in nodes {
        s.push_str(&format!("dhcp-host={},{},{}\n", n.mac, n.ip, n.name));
    }
    s.push_str(&format!("enable-tftp\ntftp-root={sd}/tftp\n"));
    s.push_str("dhcp-match=set:ipxe,175\n");
    s.push_str(&format!(
        "dhcp-boot=tag:ipxe,http://{gw}:{http_port}/boot.ipxe\n"
    ));
    match firmware {
        Firmware::Bios => s.push_str("dhcp-boot=tag:!ipxe,pxelinux.0\n"),
        Firmware::Uefi => {
            s.push_str("dhcp-match=set:efi64,option:client-arch,7\n");
            s.push_str("dhcp-match=set:efi64,option:client-arch,9\n");
            s.push_str("dhcp-match=set:efihttp,option:client-arch,16\n");
            s.push_str(&format!("dhcp-boot=tag:!ipxe,tag:efi64,{IPXE_EFI}\n"));
            s.push_str("dhcp-option-force=tag:efihttp,60,HTTPClient\n");
            s.push_str(&format!(
                "dhcp-boot=tag:!ipxe,tag:efihttp,http://{gw}:{http_port}/{NO_HTTP_BOOT}\n"
            ));
            s.push_str("dhcp-boot=tag:!ipxe,tag:!efi64,tag:!efihttp,pxelinux.0\n");
        }
    }
    // The two speed fixes of lab.md: an RA so iPXE does not wait for IPv6, and
    // "no ProxyDHCP" so it does not wait for a proxy offer.
    s.push_str(&format!(
        "enable-ra\ndhcp-range={},ra-only,64\n",
        subnet.ipv6_prefix()
    ));
    s.push_str("dhcp-option-force=tag:ipxe,encap:175,176,1b\n");
    s
}

/// Text of `boot.ipxe`, the script every iPXE client gets from DHCP: chain the node's own
/// profile `nodes/<mac-hexhyp>.ipxe`, else `nodes/default.ipxe`, else boot the local disk.
///
/// A profile that boots the local disk ends in `exit` (kd's is `sanboot --no-describe
/// --drive 0x80 || exit`), which returns here. iPXE then exits, and the firmware moves on to
/// the next boot device, the disk. Not so on UEFI: iPXE returning success makes OVMF stop
/// and show its boot manager menu, so a UEFI lab's script exits with an error status instead
/// (`exit 1`), and OVMF tries its next boot option.
pub fn boot_ipxe(subnet: &Subnet, http_port: u16, firmware: Firmware) -> String {
    let base = format!("http://{}:{http_port}", subnet.gateway());
    format!(
        "#!ipxe\n\
         echo kd-lab: ${{net0/mac}} ${{net0/ip}} profile nodes/${{net0/mac:hexhyp}}.ipxe\n\
         chain --autofree {base}/nodes/${{net0/mac:hexhyp}}.ipxe || \
         chain --autofree {base}/nodes/default.ipxe || goto local\n\
         :local\n\
         echo kd-lab: no profile, booting from disk\n\
         exit{}\n",
        match firmware {
            Firmware::Bios => "",
            Firmware::Uefi => " 1",
        }
    )
}

/// pxelinux default configuration (non-iPXE clients): boot the local disk.
pub const PXELINUX_DEFAULT: &str = "DEFAULT local\nPROMPT 0\nLABEL local\n  LOCALBOOT 0\n";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when [`kvm_usable`](crate::kvm_usable) says so, TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization.
    Kvm,
    /// Software emulation (`tcg,tb-size=256`).
    Tcg,
}

impl FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::Invalid(format!(
                "accel {s:?}: expected auto|kvm|tcg"
            ))),
        }
    }
}

/// The nodes' firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (QEMU's default): PXE through the NIC's iPXE ROM, GRUB i386-pc from the disk.
    #[default]
    Bios,
    /// OVMF (UEFI) in pflash: its PXE client fetches iPXE's EFI binary ([`IPXE_EFI`]) by TFTP,
    /// which chains `boot.ipxe`; GRUB x86_64-efi from the ESP's `\EFI\BOOT\BOOTX64.EFI`.
    Uefi,
}

impl Firmware {
    /// `bios` or `uefi`.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }
}

impl FromStr for Firmware {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" | "efi" => Ok(Firmware::Uefi),
            _ => Err(Error::Invalid(format!(
                "firmware {s:?}: expected bios|uefi"
            ))),
        }
    }
}

/// OVMF's code, mapped read-only as the first pflash unit (Debian package `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's variable store template: each UEFI node gets its own writable copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// iPXE for UEFI PXE clients (Debian package `ipxe`), served by TFTP under this name. The
/// SNP-only build drives the NIC through the firmware's own network stack (here the iPXE
/// driver of QEMU's efi-virtio.rom), as a chain-loaded iPXE should.
pub const IPXE_EFI: &str = "snponly.efi";
/// The UEFI HTTP boot URL path dnsmasq hands out: nothing is served there (see
/// [`dnsmasq_conf`]).
pub const NO_HTTP_BOOT: &str = "kd-lab-no-uefi-http-boot.efi";
/// Where [`IPXE_EFI`] is found on the host, in order of preference: `./dev.sh setup` unpacks
/// the `ipxe` package there (installing it would run update-grub and add iPXE entries to the
/// host's own boot menu), or the package's own paths when it is installed.
pub const IPXE_EFI_SOURCES: [&str; 3] = [
    "/var/cache/kd/ipxe/snponly.efi",
    "/usr/lib/ipxe/snponly.efi",
    "/usr/lib/ipxe/ipxe.efi",
];

/// Paths of one node's files in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFiles {
    /// Raw disk image.
    pub disk: String,
    /// Serial console log.
    pub log: String,
    /// QMP socket.
    pub qmp: String,
    /// QEMU pid file.
    pub pidfile: String,
    /// QEMU's own stderr.
    pub qemu_err: String,
    /// The node's writable copy of the OVMF variable store (UEFI nodes only; it persists
    /// across power cycles, like a real machine's NVRAM).
    #[serde(default)]
    pub vars: String,
}

impl NodeFiles {
    /// File names of node `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Self {
        let p = |suffix: &str| {
            state_dir
                .join(format!("{name}{suffix}"))
                .display()
                .to_string()
        };
        NodeFiles {
            disk: p(".img"),
            log: p(".log"),
            qmp: p(".qmp"),
            pidfile: p(".pid"),
            qemu_err: p(".qemu.err"),
            vars: p(".vars.fd"),
        }
    }
}

/// The QEMU command line of a node (without the `ip netns exec` prefix). The process
/// daemonizes and writes its pid to `files.pidfile`. A UEFI node maps OVMF's code read-only
/// and its own variable store (`files.vars`) as pflash.
pub fn qemu_argv(
    node: &NodePlan,
    files: &NodeFiles,
    sercon: &Path,
    mem_mb: u32,
    kvm: bool,
    firmware: Firmware,
) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "qemu-system-x86_64".into(),
        "-name".into(),
        node.name.clone(),
    ];
    if kvm {
        v.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]);
    } else {
        v.extend(["-accel".into(), "tcg,tb-size=256".into()]);
    }
    v.extend([
        "-m".into(),
        mem_mb.to_string(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-display".into(),
        "none".into(),
        "-vga".into(),
        "none".into(),
        "-chardev".into(),
        format!("file,id=ser0,path={},append=on", files.log),
        "-serial".into(),
        "chardev:ser0".into(),
        "-monitor".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", files.qmp),
        "-fw_cfg".into(),
        format!("name=etc/sercon-port,file={}", sercon.display()),
    ]);
    if firmware == Firmware::Uefi {
        v.extend([
            "-drive".into(),
            format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
            "-drive".into(),
            format!("if=pflash,format=raw,unit=1,file={}", files.vars),
            // The lab has no DHCPv6: without this OVMF's PXEv6 and HTTPv6 boot options wait
            // for one after iPXE gave up (local boot) before the disk's turn comes.
            "-fw_cfg".into(),
            "name=opt/org.tianocore/IPv6Support,string=no".into(),
        ]);
    }
    v.extend([
        "-boot".into(),
        "strict=on,reboot-timeout=5000".into(),
        "-netdev".into(),
        format!("tap,id=n0,ifname={},script=no,downscript=no", node.tap),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", node.mac),
        "-drive".into(),
        format!("file={},if=none,id=d0,format=raw,cache=unsafe", files.disk),
        "-device".into(),
        "virtio-blk-pci,drive=d0,bootindex=2".into(),
        "-daemonize".into(),
        "-pidfile".into(),
        files.pidfile.clone(),
    ]);
    v
}

/// One node of the cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// Host name (`node1`).
    pub name: String,
    /// IPv4 address.
    pub address: String,
    /// MAC address, lowercase, colon-separated.
    pub mac: String,
    /// Rack (switch) label.
    pub rack: String,
}

/// PXE settings of the cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPxe {
    /// TFTP root (pxelinux path, `pxelinux.cfg/<IP hex>`).
    pub tftp_root: String,
    /// HTTP root: iPXE profiles go to `<http_root>/nodes/<mac-hexhyp>.ipxe`.
    pub http_root: String,
    /// URL of `http_root` as seen by the nodes.
    pub http_base_url: String,
    /// Profile naming scheme: `mac`.
    pub profile_naming: String,
}

/// Reboot templates per escalation level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReboot {
    /// First try.
    pub soft: String,
    /// Second try.
    pub hard: String,
    /// Last resort.
    pub very_hard: String,
}

/// Command templates; `HOSTNAME` is replaced by the node name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCommands {
    /// Reboot templates.
    pub reboot: ClusterReboot,
    /// Power on.
    pub power_on: String,
    /// Power off.
    pub power_off: String,
    /// Print `on` or `off`.
    pub power_status: String,
    /// Follow the serial console.
    pub console: String,
}

/// One partition of the disk layout (kd-disk's `PartitionSpec` YAML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPartition {
    /// Partition number.
    pub number: u32,
    /// Size: `1MiB`, `256MiB`, `rest`, ...
    pub size: String,
    /// Role: `bios_grub`, `swap`, `deploy`, ...
    pub role: String,
    /// File system, when the role needs one chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<String>,
}

/// The partition layout kd-disk applies (its `Layout` YAML: device, label, partitions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLayout {
    /// Whole-disk block device.
    pub device: String,
    /// `gpt` or `msdos`.
    pub label: String,
    /// Partitions in disk order.
    pub partitions: Vec<ClusterPartition>,
}

/// The target disk of every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDisk {
    /// Block device (`/dev/vda`, the virtio disk).
    pub block_device: String,
    /// Partition layout.
    pub layout: ClusterLayout,
}

/// Timeout (s) and retries of one step of the deployment workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStep {
    /// Seconds (for the reboot steps: from the reboot command to the answer).
    pub timeout: u64,
    /// Attempts after the first one.
    pub retries: u32,
}

/// The workflow section of the cluster configuration (kd-coord's `WorkflowConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterWorkflow {
    /// Reboot/power commands in flight at once.
    pub reboot_window: usize,
    /// A reboot/power command running longer is killed (s).
    pub command_timeout: u64,
    /// Delay between the final reboot and the first port probe (s).
    pub probe_delay: u64,
    /// Delay between port probes (s).
    pub probe_interval: u64,
    /// How long the broadcast barrier waits for late nodes (s).
    pub broadcast_wait: u64,
    /// Shortest wait of an agent on a silent upstream (s).
    pub stall_floor: u64,
    /// Longest wait of an agent on a silent upstream, and for the first data (s).
    pub stall_timeout: u64,
    /// Seconds without a packet before the coordinator counts an agent lost.
    pub agent_silence: u64,
    /// Deploy profile, reboot, agent Hello.
    pub set_deployment_env: ClusterStep,
    /// Partition, mkfs, mount.
    pub prepare: ClusterStep,
    /// Receive and write the image.
    pub broadcast: ClusterStep,
    /// Post-installs, key, boot loader.
    pub finish: ClusterStep,
    /// Local-boot profile, reboot, the deployed OS answers on `check_port`.
    pub boot_new_env: ClusterStep,
}

/// The cluster configuration written for kd-coord (`cluster.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Cluster name (`kdlab-<id>`).
    pub name: String,
    /// Address the coordinator listens on and agents connect to.
    pub coordinator_address: String,
    /// Target disk and its layout.
    pub disk: ClusterDisk,
    /// Nodes.
    pub nodes: Vec<ClusterNode>,
    /// PXE settings.
    pub pxe: ClusterPxe,
    /// Command templates.
    pub commands: ClusterCommands,
    /// Workflow timeouts and retries.
    pub workflow: ClusterWorkflow,
    /// TCP port the deployed OS answers on (sshd).
    pub check_port: u16,
}

/// The lab's disk: GPT on `/dev/vda`. BIOS: 1 MiB bios_grub (GRUB's core image), 256 MiB
/// swap, the rest ext4 for the deployed system. UEFI: the same with a 64 MiB vfat ESP after
/// the bios_grub partition (partition 2; swap 3, deploy 4). The cluster has one layout for
/// every node, and this hybrid one boots on both firmwares (kd-coord asks kd-disk for GRUB
/// i386-pc and x86_64-efi both), so a UEFI lab could hold BIOS nodes too; a BIOS lab keeps
/// the layout it always had.
pub fn lab_disk(firmware: Firmware) -> ClusterDisk {
    let part = |number: u32, size: &str, role: &str, fs: Option<&str>| ClusterPartition {
        number,
        size: size.into(),
        role: role.into(),
        fs: fs.map(str::to_string),
    };
    ClusterDisk {
        block_device: "/dev/vda".into(),
        layout: ClusterLayout {
            device: "/dev/vda".into(),
            label: "gpt".into(),
            partitions: match firmware {
                Firmware::Bios => vec![
                    part(1, "1MiB", "bios_grub", None),
                    part(2, "256MiB", "swap", None),
                    part(3, "rest", "deploy", Some("ext4")),
                ],
                Firmware::Uefi => vec![
                    part(1, "1MiB", "bios_grub", None),
                    part(2, "64MiB", "esp", Some("vfat")),
                    part(3, "256MiB", "swap", None),
                    part(4, "rest", "deploy", Some("ext4")),
                ],
            },
        },
    }
}

/// Workflow timeouts for lab nodes. Under TCG (no KVM, 2 shared cores) a PXE boot to the
/// agent's Hello takes 60-90 s per node and more when several boot at once, three nodes
/// writing a ~370 MB root take ~6 min, and the deployed Debian needs 60-120 s to sshd.
/// With KVM everything is ~10x faster and the same values only bound failures.
pub fn lab_workflow() -> ClusterWorkflow {
    let step = |timeout: u64, retries: u32| ClusterStep { timeout, retries };
    ClusterWorkflow {
        reboot_window: 10,
        command_timeout: 60,
        probe_delay: 20,
        probe_interval: 5,
        broadcast_wait: 180,
        // A TCG guest stalls for seconds (two shared cores, every instruction translated): it
        // keeps a long floor for silent upstreams and 30 s (QUIC's idle timeout) before it
        // counts as dead, where a real cluster uses 2 s and 6 s.
        stall_floor: 10,
        stall_timeout: 60,
        agent_silence: 30,
        set_deployment_env: step(360, 2),
        prepare: step(240, 1),
        broadcast: step(1500, 0),
        finish: step(300, 1),
        boot_new_env: step(480, 1),
    }
}

/// Build the cluster configuration. `kd_lab` is the absolute path of the kd-lab binary.
pub fn cluster_config(
    name: &str,
    subnet: &Subnet,
    nodes: &[NodePlan],
    state_dir: &Path,
    http_port: u16,
    kd_lab: &Path,
    firmware: Firmware,
) -> ClusterConfig {
    let sd = state_dir.display();
    let bin = kd_lab.display();
    let power = |action: &str| format!("{bin} power --state {sd} HOSTNAME {action}");
    ClusterConfig {
        name: name.to_string(),
        coordinator_address: subnet.gateway().to_string(),
        disk: lab_disk(firmware),
        nodes: nodes
            .iter()
            .map(|n| ClusterNode {
                name: n.name.clone(),
                address: n.ip.to_string(),
                mac: n.mac.clone(),
                rack: n.rack.clone(),
            })
            .collect(),
        pxe: ClusterPxe {
            tftp_root: format!("{sd}/tftp"),
            http_root: format!("{sd}/http"),
            http_base_url: format!("http://{}:{http_port}", subnet.gateway()),
            profile_naming: "mac".into(),
        },
        commands: ClusterCommands {
            // `reset` fails at once on a node that is off; escalation then reaches `cycle`,
            // which works from any state (a deployment may start from powered-off nodes).
            reboot: ClusterReboot {
                soft: power("reset"),
                hard: power("cycle"),
                very_hard: power("cycle"),
            },
            power_on: power("on"),
            power_off: power("off"),
            power_status: power("status"),
            console: format!("{bin} console --state {sd} HOSTNAME"),
        },
        workflow: lab_workflow(),
        check_port: 22,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_parse_and_derive() {
        let s: Subnet = "10.77.0.0/24".parse().unwrap();
        assert_eq!(s, Subnet::DEFAULT);
        assert_eq!(s.id(), "77");
        assert_eq!(s.netns(), "kdlab-77");
        assert_eq!(s.gateway().to_string(), "10.77.0.1");
        assert_eq!(s.node_ip(1).to_string(), "10.77.0.11");
        assert_eq!(s.node_mac(1), "52:54:00:4d:00:0b");
        assert_eq!(s.ipv6_prefix(), "fd4d:0::");
        let t: Subnet = "192.168.5.0".parse().unwrap();
        assert_eq!(t.id(), "192-168-5");
        assert_eq!(t.to_string(), "192.168.5.0/24");
        for bad in ["10.77.0.1/24", "10.77.0.0/16", "x", "10.77.0.0/"] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn node_plan() {
        let n = nodes(&Subnet::DEFAULT, 3, 2).unwrap();
        assert_eq!(n.len(), 3);
        assert_eq!(n[2].name, "node3");
        assert_eq!(n[2].tap, "tap3");
        assert_eq!(n[2].ip.to_string(), "10.77.0.13");
        assert_eq!(
            n.iter().map(|n| n.rack.as_str()).collect::<Vec<_>>(),
            ["rack1", "rack1", "rack2"]
        );
        assert!(nodes(&Subnet::DEFAULT, 0, 2).is_err());
        assert!(nodes(&Subnet::DEFAULT, MAX_NODES + 1, 2).is_err());
        let all = nodes(&Subnet::DEFAULT, MAX_NODES, 2).unwrap();
        assert_eq!(all[MAX_NODES - 1].ip.to_string(), "10.77.0.210");
    }

    #[test]
    fn names() {
        assert_eq!(mac_hexhyp("52:54:00:4D:00:0B"), "52-54-00-4d-00-0b");
        assert_eq!(ip_hex("10.77.0.102".parse().unwrap()), "0A4D0066");
    }

    #[test]
    fn dnsmasq_has_the_lab_md_options() {
        let n = nodes(&Subnet::DEFAULT, 2, 2).unwrap();
        let c = dnsmasq_conf(&Subnet::DEFAULT, &n, Path::new("/s"), 8080, Firmware::Bios);
        for line in [
            "port=0",
            "interface=kdbr0",
            "bind-interfaces",
            "dhcp-host=52:54:00:4d:00:0b,10.77.0.11,node1",
            "dhcp-host=52:54:00:4d:00:0c,10.77.0.12,node2",
            "enable-tftp",
            "tftp-root=/s/tftp",
            "dhcp-match=set:ipxe,175",
            "dhcp-boot=tag:ipxe,http://10.77.0.1:8080/boot.ipxe",
            "dhcp-boot=tag:!ipxe,pxelinux.0",
            "enable-ra",
            "dhcp-range=fd4d:0::,ra-only,64",
            "dhcp-option-force=tag:ipxe,encap:175,176,1b",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line}\n{c}");
        }
    }

    #[test]
    fn ipxe_script_chains_per_mac_profile() {
        let s = boot_ipxe(&Subnet::DEFAULT, 8080, Firmware::Bios);
        assert!(s.starts_with("#!ipxe\n"));
        assert!(s.contains("chain --autofree http://10.77.0.1:8080/nodes/${net0/mac:hexhyp}.ipxe"));
        assert!(s.contains("\nexit\n"));
        // UEFI: an error status, so that OVMF goes on to the disk instead of its menu.
        let u = boot_ipxe(&Subnet::DEFAULT, 8080, Firmware::Uefi);
        assert!(u.ends_with("\nexit 1\n"), "{u}");
        assert_eq!(u.replace("exit 1", "exit"), s);
    }

    #[test]
    fn qemu_command_line() {
        let n = &nodes(&Subnet::DEFAULT, 1, 2).unwrap()[0];
        let f = NodeFiles::new(Path::new("/s"), &n.name);
        let a = qemu_argv(
            n,
            &f,
            Path::new("/s/sercon-port.bin"),
            512,
            false,
            Firmware::Bios,
        );
        let j = a.join(" ");
        assert!(j.starts_with("qemu-system-x86_64 -name node1 -accel tcg,tb-size=256 -m 512"));
        assert!(j.contains("mac=52:54:00:4d:00:0b,bootindex=1"));
        assert!(j.contains("virtio-blk-pci,drive=d0,bootindex=2"));
        assert!(j.contains("-qmp unix:/s/node1.qmp,server=on,wait=off"));
        assert!(j.contains("file=/s/node1.img,if=none"));
        assert!(j.contains("-pidfile /s/node1.pid"));
        let k = qemu_argv(
            n,
            &f,
            Path::new("/s/sercon-port.bin"),
            512,
            true,
            Firmware::Bios,
        )
        .join(" ");
        assert!(k.contains("-accel kvm -cpu host"));
    }

    #[test]
    fn cluster_yaml_shape() {
        let n = nodes(&Subnet::DEFAULT, 2, 2).unwrap();
        let c = cluster_config(
            "kdlab-77",
            &Subnet::DEFAULT,
            &n,
            Path::new("/s"),
            8080,
            Path::new("/bin/kd-lab"),
            Firmware::Bios,
        );
        let y = serde_norway::to_string(&c).unwrap();
        let back: ClusterConfig = serde_norway::from_str(&y).unwrap();
        assert_eq!(back, c);
        let v: serde_norway::Value = serde_norway::from_str(&y).unwrap();
        assert_eq!(v["nodes"][0]["mac"].as_str(), Some("52:54:00:4d:00:0b"));
        assert_eq!(v["coordinator_address"].as_str(), Some("10.77.0.1"));
        assert_eq!(
            v["commands"]["reboot"]["soft"].as_str(),
            Some("/bin/kd-lab power --state /s HOSTNAME reset")
        );
        assert_eq!(
            v["pxe"]["http_base_url"].as_str(),
            Some("http://10.77.0.1:8080")
        );
        // Escalation reaches a command that works on a powered-off node.
        assert_eq!(
            v["commands"]["reboot"]["hard"].as_str(),
            Some("/bin/kd-lab power --state /s HOSTNAME cycle")
        );
        assert_eq!(v["check_port"].as_u64(), Some(22));
        assert_eq!(v["disk"]["block_device"].as_str(), Some("/dev/vda"));
        let parts = v["disk"]["layout"]["partitions"].as_sequence().unwrap();
        let roles: Vec<_> = parts.iter().map(|p| p["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["bios_grub", "swap", "deploy"]);
        assert_eq!(parts[2]["size"].as_str(), Some("rest"));
        assert_eq!(parts[2]["fs"].as_str(), Some("ext4"));
        assert!(parts[0].get("fs").is_none());
        let w = &v["workflow"];
        for step in [
            "set_deployment_env",
            "prepare",
            "broadcast",
            "finish",
            "boot_new_env",
        ] {
            assert!(w[step]["timeout"].as_u64().unwrap() >= 60, "{step}");
        }
        // TCG: a PXE boot to the agent takes 60-90 s, the deployed Debian 60-120 s to sshd.
        assert!(w["set_deployment_env"]["timeout"].as_u64().unwrap() >= 240);
        assert!(w["boot_new_env"]["timeout"].as_u64().unwrap() >= 300);
        // Slow guests are not declared dead or stalled as fast as real nodes.
        assert!(w["stall_floor"].as_u64().unwrap() >= 10);
        assert!(w["agent_silence"].as_u64().unwrap() >= 30);
    }

    /// kd-disk accepts the layout kd-lab writes and resolves it on the lab's 4 GiB disk.
    #[test]
    fn disk_layout_is_kd_disks() {
        let layout = serde_norway::to_string(&lab_disk(Firmware::Bios).layout).unwrap();
        let l = kd_disk::layout::Layout::from_yaml(&layout).unwrap();
        let plan = l.resolve(4 << 30, None).unwrap();
        let deploy = plan.deploy().unwrap();
        assert_eq!(deploy.number, 3);
        assert_eq!(deploy.fs, Some(kd_disk::layout::FsType::Ext4));
        assert!(deploy.size > 3 << 30, "{}", deploy.size);
        assert_eq!(
            plan.with_role(kd_disk::layout::Role::Swap)
                .next()
                .unwrap()
                .size,
            256 << 20
        );
        assert!(plan.needed_bytes() <= 4 << 30);
    }

    #[test]
    fn uefi_dnsmasq_gives_efi_clients_ipxe_efi() {
        let n = nodes(&Subnet::DEFAULT, 1, 2).unwrap();
        let bios = dnsmasq_conf(&Subnet::DEFAULT, &n, Path::new("/s"), 8080, Firmware::Bios);
        assert!(!bios.contains("efi64"), "{bios}");
        let c = dnsmasq_conf(&Subnet::DEFAULT, &n, Path::new("/s"), 8080, Firmware::Uefi);
        for line in [
            "dhcp-match=set:ipxe,175",
            "dhcp-match=set:efi64,option:client-arch,7",
            "dhcp-match=set:efi64,option:client-arch,9",
            "dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
            "dhcp-boot=tag:!ipxe,tag:!efi64,tag:!efihttp,pxelinux.0",
            "dhcp-match=set:efihttp,option:client-arch,16",
            "dhcp-option-force=tag:efihttp,60,HTTPClient",
            "dhcp-boot=tag:!ipxe,tag:efihttp,http://10.77.0.1:8080/kd-lab-no-uefi-http-boot.efi",
            "dhcp-boot=tag:ipxe,http://10.77.0.1:8080/boot.ipxe",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line}\n{c}");
        }
        // Exactly one boot file per client kind: the tag sets do not overlap.
        assert!(
            !c.lines().any(|l| l == "dhcp-boot=tag:!ipxe,pxelinux.0"),
            "{c}"
        );
        assert_eq!("uefi".parse::<Firmware>().unwrap(), Firmware::Uefi);
        assert_eq!("bios".parse::<Firmware>().unwrap(), Firmware::Bios);
        assert!("coreboot".parse::<Firmware>().is_err());
    }

    #[test]
    fn uefi_qemu_maps_ovmf_and_its_own_vars() {
        let n = &nodes(&Subnet::DEFAULT, 1, 2).unwrap()[0];
        let f = NodeFiles::new(Path::new("/s"), &n.name);
        assert_eq!(f.vars, "/s/node1.vars.fd");
        let bios = qemu_argv(
            n,
            &f,
            Path::new("/s/sercon-port.bin"),
            512,
            false,
            Firmware::Bios,
        );
        assert!(!bios.join(" ").contains("pflash"));
        let a = qemu_argv(
            n,
            &f,
            Path::new("/s/sercon-port.bin"),
            512,
            false,
            Firmware::Uefi,
        );
        let j = a.join(" ");
        assert!(j.starts_with("qemu-system-x86_64 -name node1 "), "{j}");
        assert!(j.contains(&format!(
            "-drive if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE} "
        )));
        assert!(j.contains("-drive if=pflash,format=raw,unit=1,file=/s/node1.vars.fd "));
        assert!(j.contains("-fw_cfg name=opt/org.tianocore/IPv6Support,string=no "));
        // Same boot order as BIOS: network first, then the disk.
        assert!(j.contains("bootindex=1") && j.contains("virtio-blk-pci,drive=d0,bootindex=2"));
    }

    /// kd-disk accepts the UEFI lab's hybrid layout: bios_grub, a vfat ESP, swap, deploy.
    #[test]
    fn uefi_disk_layout_has_an_esp() {
        let layout = serde_norway::to_string(&lab_disk(Firmware::Uefi).layout).unwrap();
        let l = kd_disk::layout::Layout::from_yaml(&layout).unwrap();
        let plan = l.resolve(4 << 30, None).unwrap();
        let esp = plan.with_role(kd_disk::layout::Role::Esp).next().unwrap();
        assert_eq!(esp.number, 2);
        assert_eq!(esp.fs, Some(kd_disk::layout::FsType::Vfat));
        assert_eq!(esp.size, 64 << 20);
        assert_eq!(
            plan.with_role(kd_disk::layout::Role::BiosGrub)
                .next()
                .unwrap()
                .number,
            1
        );
        let deploy = plan.deploy().unwrap();
        assert_eq!(deploy.number, 4);
        assert!(deploy.size > 3 << 30, "{}", deploy.size);
        assert!(plan.needed_bytes() <= 4 << 30);
        // A BIOS lab keeps its layout.
        let roles: Vec<String> = lab_disk(Firmware::Bios)
            .layout
            .partitions
            .iter()
            .map(|p| p.role.clone())
            .collect();
        assert_eq!(roles, ["bios_grub", "swap", "deploy"]);
    }
}
