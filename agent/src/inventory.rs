//! What the node has, read from /sys and /proc (best effort: missing files give empty fields).

use std::fs;

use kd_proto::msg::{BootMode, DiskInfo, Inventory, NicInfo};

fn read(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Reads the inventory of this machine.
pub fn collect() -> Inventory {
    let mut disks = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/block") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("ram") || name.starts_with("zram") {
                continue;
            }
            let sectors: u64 = read(&format!("/sys/block/{name}/size"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if sectors == 0 {
                continue;
            }
            disks.push(DiskInfo {
                rotational: read(&format!("/sys/block/{name}/queue/rotational")).as_deref()
                    == Some("1"),
                model: read(&format!("/sys/block/{name}/device/model")).unwrap_or_default(),
                size_bytes: sectors * 512,
                name,
            });
        }
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    let mut nics = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name == "lo" {
                continue;
            }
            nics.push(NicInfo {
                mac: read(&format!("/sys/class/net/{name}/address")).unwrap_or_default(),
                speed_mbps: read(&format!("/sys/class/net/{name}/speed"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                name,
            });
        }
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    let ram_bytes = read("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    Inventory {
        disks,
        ram_bytes,
        nics,
        boot_mode: if std::path::Path::new("/sys/firmware/efi").exists() {
            BootMode::Uefi
        } else {
            BootMode::Bios
        },
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn inventory_of_this_machine() {
        let i = super::collect();
        assert!(i.ram_bytes > 0);
        assert!(i.cpus >= 1);
    }
}
