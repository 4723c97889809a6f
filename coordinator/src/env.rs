//! Environment descriptions: what `kd-coord env add` records and `deploy -e` deploys.
//!
//! The YAML has Kadeploy's (kaenv3) fields:
//!
//! ```yaml
//! name: debian12-min                 # [A-Za-z0-9][A-Za-z0-9._-]*
//! version: 1                         # optional, default 1
//! description: Debian 12 minimal     # optional
//! author: ops@example.org            # optional
//! visibility: public                 # private (default) | shared | public
//! destructive: false                 # optional, default false
//! os: linux                          # linux (default) | xen | other
//! arch: x86_64                       # optional, default x86_64
//! image:
//!   file: /var/lib/kd/images/debian12-min.tar.zst   # path or http(s):// URL
//!   kind: tar                        # tar | dd
//!   compression: zstd                # gzip | xz | zstd | none; optional, from the file name
//! boot:                              # needed for tar images
//!   kernel: /vmlinuz                 # path inside the image
//!   initrd: /initrd.img              # optional
//!   kernel_params: console=ttyS0     # optional
//! filesystem: ext4                   # mkfs type; needed for tar images
//! partition_type: 0x83               # MBR type (number or "0x83"); optional, default 0x83
//! postinstalls:                      # optional
//!   - archive: /var/lib/kd/post/site.tgz
//!     compression: gzip              # optional, from the file name
//!     script: traitement.ash /rambin # run from the unpacked archive; "none" to only unpack
//! ```
//!
//! [`Environment::parse`] returns the description or an error naming the field and the line.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

use crate::config::{is_valid_name, ConfigError};

/// Who may see and deploy an environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Only its owner.
    #[default]
    Private,
    /// Everyone, but listed only when the owner is named.
    Shared,
    /// Everyone.
    Public,
}

/// Operating-system family (Kadeploy's `os`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OsKind {
    /// Linux.
    #[default]
    Linux,
    /// Xen dom0.
    Xen,
    /// Anything else.
    Other,
}

/// Image layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A tar archive of a root file system, extracted onto a fresh file system.
    Tar,
    /// A raw disk or partition image, written as is.
    Dd,
}

/// Compression of an image or archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// gzip (`.gz`, `.tgz`).
    Gzip,
    /// xz (`.xz`, `.txz`).
    Xz,
    /// zstd (`.zst`, `.tzst`).
    Zstd,
    /// Not compressed.
    None,
}

impl Compression {
    /// The YAML name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// Guesses the compression from a file name (`.tar.zst`, `.tgz`, `.img`, …).
    pub fn from_file_name(name: &str) -> Option<Compression> {
        let lower = name.to_ascii_lowercase();
        let ends = |exts: &[&str]| exts.iter().any(|e| lower.ends_with(e));
        if ends(&[".gz", ".tgz"]) {
            Some(Compression::Gzip)
        } else if ends(&[".xz", ".txz"]) {
            Some(Compression::Xz)
        } else if ends(&[".zst", ".zstd", ".tzst", ".kdi"]) {
            // A kd image (`kd-coord image pack`): zstd frames, served as they are.
            Some(Compression::Zstd)
        } else if ends(&[".tar", ".img", ".raw", ".dd", ".iso"]) {
            Some(Compression::None)
        } else {
            None
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.to_ascii_lowercase().as_str() {
            "gzip" | "gz" | "tgz" => Ok(Compression::Gzip),
            "xz" | "txz" => Ok(Compression::Xz),
            "zstd" | "zst" => Ok(Compression::Zstd),
            "none" | "" => Ok(Compression::None),
            "bzip2" | "bz2" | "tbz2" => Err(serde::de::Error::custom(
                "bzip2 is not supported by kd (use gzip, xz, zstd or none)",
            )),
            other => Err(serde::de::Error::custom(format!(
                "unknown compression `{other}`, expected gzip, xz, zstd or none"
            ))),
        }
    }
}

/// The image of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// Path (on the coordinator) or `http(s)://` URL.
    pub file: String,
    /// Tar or raw image.
    pub kind: ImageKind,
    /// Compression; guessed from `file` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
}

/// How the deployed system boots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Boot {
    /// Kernel path inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initrd path inside the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_params: Option<String>,
}

/// A post-install archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Postinstall {
    /// Path or URL of the archive (tar).
    pub archive: String,
    /// Compression; guessed from `archive` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Compression>,
    /// Command run from the unpacked archive; `None` (YAML `none`) only unpacks it.
    #[serde(
        default,
        deserialize_with = "de_script",
        skip_serializing_if = "Option::is_none"
    )]
    pub script: Option<String>,
}

fn de_script<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    Ok(s.filter(|s| !s.trim().is_empty() && s.trim() != "none"))
}

fn de_partition_type<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    struct V;
    const WANT: &str = "an MBR partition type from 0x01 to 0xff";
    impl serde::de::Visitor<'_> for V {
        type Value = u8;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(WANT)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u8, E> {
            u8::try_from(v)
                .ok()
                .filter(|v| *v != 0)
                .ok_or_else(|| E::custom(format!("{v:#x} is not {WANT}")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u8, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("{v} is not {WANT}")))
                .and_then(|v| self.visit_u64(v))
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<u8, E> {
            let t = s.trim();
            let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => t.parse().ok(),
            };
            match v {
                Some(v) => self.visit_u64(v),
                None => Err(E::custom(format!("{s:?} is not {WANT}"))),
            }
        }
    }
    d.deserialize_any(V)
}

fn default_version() -> u32 {
    1
}

fn default_arch() -> String {
    "x86_64".into()
}

fn default_partition_type() -> u8 {
    0x83
}

/// An environment description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// Name.
    pub name: String,
    /// Version (≥ 1).
    #[serde(default = "default_version")]
    pub version: u32,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Author.
    #[serde(default)]
    pub author: String,
    /// Who may see it.
    #[serde(default)]
    pub visibility: Visibility,
    /// Deploying it destroys other partitions (whole-disk images).
    #[serde(default)]
    pub destructive: bool,
    /// OS family.
    #[serde(default)]
    pub os: OsKind,
    /// CPU architecture.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// The image.
    pub image: Image,
    /// How the deployed system boots.
    #[serde(default)]
    pub boot: Boot,
    /// File system created for tar images (`ext4`, `xfs`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// MBR partition type.
    #[serde(
        default = "default_partition_type",
        deserialize_with = "de_partition_type"
    )]
    pub partition_type: u8,
    /// Post-install archives, run in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub postinstalls: Vec<Postinstall>,
    /// Kadeploy's multi-partition images; accepted for compatibility, only `false` is supported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multipart: bool,
}

/// File systems kd can create for tar images.
pub const FILESYSTEMS: [&str; 5] = ["ext2", "ext3", "ext4", "xfs", "btrfs"];

impl Environment {
    /// Parses and validates a description. Compressions left out are filled in from the file
    /// names. Errors name the field and, when found, the line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut env: Environment =
            serde_norway::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        env.validate(text)?;
        Ok(env)
    }

    /// Serialises to YAML.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_norway::to_string(self).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Checks every rule and fills in compressions; `text` is only used to find lines.
    pub fn validate(&mut self, text: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, msg: String| Err(ConfigError::invalid(text, field, msg));
        if self.multipart {
            return bad(
                "multipart",
                "multi-partition images are not supported: use a single tar or dd image".into(),
            );
        }
        if !is_valid_name(&self.name) {
            return bad(
                "name",
                format!(
                    "invalid environment name {:?} (letters, digits, '.', '_', '-')",
                    self.name
                ),
            );
        }
        if self.version == 0 {
            return bad("version", "must be at least 1".into());
        }
        if !is_valid_name(&self.arch) {
            return bad("arch", format!("invalid architecture {:?}", self.arch));
        }
        if let Err(m) = check_location(&self.image.file) {
            return bad("image.file", m);
        }
        if self.image.compression.is_none() {
            match Compression::from_file_name(&self.image.file) {
                Some(c) => self.image.compression = Some(c),
                None => {
                    return bad(
                        "image.file",
                        format!(
                            "cannot tell the compression of {:?}: add image.compression (gzip, xz, zstd or none)",
                            self.image.file
                        ),
                    )
                }
            }
        }
        if self.image.kind == ImageKind::Tar {
            if self.boot.kernel.as_deref().is_none_or(str::is_empty) {
                return bad(
                    "boot.kernel",
                    "missing: a tar image needs the path of its kernel".into(),
                );
            }
            if self.filesystem.is_none() {
                return bad(
                    "filesystem",
                    "missing: a tar image needs a file system to be extracted on".into(),
                );
            }
        }
        if let Some(fs) = &self.filesystem {
            if !FILESYSTEMS.contains(&fs.as_str()) {
                return bad(
                    "filesystem",
                    format!(
                        "unsupported file system {fs:?} (one of {})",
                        FILESYSTEMS.join(", ")
                    ),
                );
            }
        }
        for (field, v) in [
            ("boot.kernel", &self.boot.kernel),
            ("boot.initrd", &self.boot.initrd),
        ] {
            if let Some(p) = v {
                if !p.starts_with('/') || p.contains("..") || p.chars().any(char::is_whitespace) {
                    return bad(
                        field,
                        format!("{p:?} must be an absolute path inside the image, without '..' or spaces"),
                    );
                }
            }
        }
        if let Some(params) = &self.boot.kernel_params {
            if params.contains('\n') {
                return bad("boot.kernel_params", "must be on one line".into());
            }
        }
        for (i, p) in self.postinstalls.iter_mut().enumerate() {
            if let Err(m) = check_location(&p.archive) {
                return bad(&format!("postinstalls[{i}].archive"), m);
            }
            if p.compression.is_none() {
                match Compression::from_file_name(&p.archive) {
                    Some(c) => p.compression = Some(c),
                    None => {
                        return bad(
                            &format!("postinstalls[{i}].archive"),
                            format!(
                                "cannot tell the compression of {:?}: add compression",
                                p.archive
                            ),
                        )
                    }
                }
            }
        }
        Ok(())
    }

    /// Kadeploy's short image kind: `tgz`, `txz`, `tzst`, `tar`, `ddgz`, `ddxz`, `ddzst`, `dd`.
    pub fn kind_name(&self) -> String {
        let c = match self.image.compression {
            Some(Compression::Gzip) => "gz",
            Some(Compression::Xz) => "xz",
            Some(Compression::Zstd) => "zst",
            Some(Compression::None) | None => "",
        };
        match self.image.kind {
            ImageKind::Tar if c.is_empty() => "tar".into(),
            ImageKind::Tar => format!("t{c}"),
            ImageKind::Dd => format!("dd{c}"),
        }
    }
}

fn check_location(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("empty".into());
    }
    if s.starts_with("http://") || s.starts_with("https://") || s.starts_with('/') {
        Ok(())
    } else if let Some(p) = s
        .strip_prefix("server://")
        .or_else(|| s.strip_prefix("local://"))
    {
        if p.starts_with('/') {
            Ok(())
        } else {
            Err(format!("{s:?}: the path must be absolute"))
        }
    } else {
        Err(format!(
            "{s:?} must be an absolute path or an http(s)://, server:// or local:// URL"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENV: &str = "\
name: debian12-min
version: 2
description: Debian 12 minimal
author: kd
visibility: public
image:
  file: /var/lib/kd/images/debian12-min.tar.zst
  kind: tar
boot:
  kernel: /vmlinuz
  initrd: /initrd.img
  kernel_params: console=ttyS0 net.ifnames=0
filesystem: ext4
partition_type: 0x83
postinstalls:
  - archive: /var/lib/kd/post/site.tgz
    script: traitement.ash /rambin
  - archive: /var/lib/kd/post/extra.tar
    compression: none
    script: none
";

    fn err(text: &str) -> String {
        Environment::parse(text).unwrap_err().to_string()
    }

    /// The example in the module documentation parses.
    #[test]
    fn documented_example_parses() {
        let yaml = crate::config::documented_yaml(include_str!("env.rs"));
        assert!(yaml.len() > 100);
        Environment::parse(&yaml).unwrap();
    }

    #[test]
    fn parses_full_description() {
        let e = Environment::parse(ENV).unwrap();
        assert_eq!(e.name, "debian12-min");
        assert_eq!(e.version, 2);
        assert_eq!(e.visibility, Visibility::Public);
        assert!(!e.destructive);
        assert_eq!(e.os, OsKind::Linux);
        assert_eq!(e.arch, "x86_64");
        assert_eq!(e.image.kind, ImageKind::Tar);
        assert_eq!(e.image.compression, Some(Compression::Zstd));
        assert_eq!(e.kind_name(), "tzst");
        assert_eq!(e.boot.kernel.as_deref(), Some("/vmlinuz"));
        assert_eq!(e.partition_type, 0x83);
        assert_eq!(e.postinstalls.len(), 2);
        assert_eq!(e.postinstalls[0].compression, Some(Compression::Gzip));
        assert_eq!(
            e.postinstalls[0].script.as_deref(),
            Some("traitement.ash /rambin")
        );
        assert_eq!(e.postinstalls[1].script, None);
        let again = Environment::parse(&e.to_yaml().unwrap()).unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn kadeploy_multipart_field() {
        let e = Environment::parse("name: a\nimage: {file: /a.raw, kind: dd}\nmultipart: false\n")
            .unwrap();
        assert!(!e.multipart);
        let err = Environment::parse("name: a\nimage: {file: /a.raw, kind: dd}\nmultipart: true\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("multipart") && err.contains("not supported"),
            "{err}"
        );
    }

    #[test]
    fn minimal_dd_image_and_defaults() {
        let e = Environment::parse(
            "name: raw\nimage: {file: 'https://h/x.img.xz', kind: dd}\npartition_type: '0x0c'\n",
        )
        .unwrap();
        assert_eq!(e.version, 1);
        assert_eq!(e.visibility, Visibility::Private);
        assert_eq!(e.image.compression, Some(Compression::Xz));
        assert_eq!(e.kind_name(), "ddxz");
        assert_eq!(e.partition_type, 0x0c);
        assert_eq!(e.filesystem, None);
        let e =
            Environment::parse("name: r\nimage: {file: /a.raw, kind: dd}\npartition_type: 131\n")
                .unwrap();
        assert_eq!(e.partition_type, 0x83);
        assert_eq!(e.kind_name(), "dd");
        // A kd image made by `kd-coord image pack` needs no compression field.
        let e = Environment::parse(
            "name: k\nimage: {file: /srv/debian12.kdi, kind: tar}\nfilesystem: ext4\nboot: {kernel: /vmlinuz}\n",
        )
        .unwrap();
        assert_eq!(e.image.compression, Some(Compression::Zstd));
        assert_eq!(e.kind_name(), "tzst");
    }

    #[test]
    fn semantic_errors_name_field_and_line() {
        assert_eq!(
            err(&ENV.replace("filesystem: ext4\n", "")),
            "filesystem: missing: a tar image needs a file system to be extracted on"
        );
        assert_eq!(
            err(&ENV.replace("filesystem: ext4", "filesystem: ntfs")),
            "line 13: filesystem: unsupported file system \"ntfs\" (one of ext2, ext3, ext4, xfs, btrfs)"
        );
        assert_eq!(
            err(&ENV.replace("  kernel: /vmlinuz\n", "")),
            "boot.kernel: missing: a tar image needs the path of its kernel"
        );
        assert_eq!(
            err(&ENV.replace("debian12-min.tar.zst", "debian12-min.bin")),
            "line 7: image.file: cannot tell the compression of \"/var/lib/kd/images/debian12-min.bin\": add image.compression (gzip, xz, zstd or none)"
        );
        assert_eq!(
            err(&ENV.replace("/var/lib/kd/post/site.tgz", "post/site.tgz")),
            "line 16: postinstalls[0].archive: \"post/site.tgz\" must be an absolute path or an http(s)://, server:// or local:// URL"
        );
        assert_eq!(
            err(&ENV.replace("/var/lib/kd/post/extra.tar", "/x/extra.bin").replace("    compression: none\n", "")),
            "line 18: postinstalls[1].archive: cannot tell the compression of \"/x/extra.bin\": add compression"
        );
        assert_eq!(
            err(&ENV.replace("name: debian12-min", "name: 'debian 12'")),
            "line 1: name: invalid environment name \"debian 12\" (letters, digits, '.', '_', '-')"
        );
        assert_eq!(
            err(&ENV.replace("  initrd: /initrd.img", "  initrd: initrd.img")),
            "line 11: boot.initrd: \"initrd.img\" must be an absolute path inside the image, without '..' or spaces"
        );
        assert_eq!(
            err(&ENV.replace("version: 2", "version: 0")),
            "line 2: version: must be at least 1"
        );
    }

    #[test]
    fn syntax_errors_name_field_and_line() {
        let e = err(&ENV.replace("visibility: public", "visibility: world"));
        assert!(e.starts_with("visibility: unknown variant `world`"), "{e}");
        assert!(e.contains("line 5"), "{e}");
        let e = err(&ENV.replace("  kind: tar", "  kind: fsa"));
        assert!(e.starts_with("image.kind: unknown variant `fsa`"), "{e}");
        let e = err(&ENV.replace("  kind: tar", "  kind: tar\n  compression: bzip2"));
        assert!(e.contains("bzip2 is not supported"), "{e}");
        assert!(e.starts_with("image: "), "{e}");
        let e = err(&ENV.replace("partition_type: 0x83", "partition_type: 0x183"));
        assert!(
            e.starts_with("partition_type: 0x183 is not an MBR partition type"),
            "{e}"
        );
        assert!(e.contains("line 14"), "{e}");
        let e = err(&ENV.replace("author: kd", "autor: kd"));
        assert!(e.contains("unknown field `autor`"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let e = err("description: no name\n");
        assert!(e.contains("missing field `name`"), "{e}");
    }
}
