//! The agent's configuration: a TOML file (`--config`) whose every key is also a flag; flags
//! win. [`Config::validate`] is what `--check-config` runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default `/metrics` address (loopback: exposing it is a deliberate choice).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// Default bound on the incident files in the spool.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 << 20;
/// Default bound on the Alertmanager deliveries waiting in the spool (a delivery's file is
/// about 1 KiB: ~10 MiB at the bound).
pub const DEFAULT_MAX_PENDING: u64 = 10_000;
pub use itewatch_core::simulate::stream::{SOAK, STORM};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Keys of the TOML file. All optional; see [`Config`] for the meaning.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub spool: Option<PathBuf>,
    pub spool_max_bytes: Option<u64>,
    pub alertmanager_urls: Option<Vec<String>>,
    pub stdout: Option<bool>,
    pub replay: Option<PathBuf>,
    pub simulate: Option<String>,
    pub seed: Option<u64>,
    pub rate: Option<u64>,
    pub max_pending: Option<u64>,
    /// Files or terminals that get a compact JSON line for every incident revision, written
    /// synchronously by whichever agent thread still runs (agent/lastgasp.rs).
    pub last_gasp: Option<Vec<PathBuf>>,
    /// Critical revisions also go to the kernel log (/dev/kmsg, KERN_CRIT).
    pub kmsg: Option<bool>,
}

/// Where records come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// The probes on this host.
    Live,
    /// A trace file, played as fast as possible; the agent then keeps serving.
    Replay(PathBuf),
    /// A simulated scenario.
    Simulate { scenario: String, seed: u64 },
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    /// Spool directory; `None`: incidents are kept in memory only.
    pub spool: Option<PathBuf>,
    pub spool_max_bytes: u64,
    /// Alertmanager base URLs (`http://host:port`); alerts go to `<url>/api/v2/alerts`.
    pub alertmanager_urls: Vec<String>,
    /// One JSON line per incident on stdout.
    pub stdout: bool,
    pub source: SourceConfig,
    /// Pace a replayed or simulated source at this many records per second (`None`: as fast
    /// as possible).
    pub rate: Option<u64>,
    /// Bound on the Alertmanager deliveries waiting (in the spool and in memory); past it the
    /// oldest are dropped, logged and counted.
    pub max_pending: usize,
    /// The last-gasp channels (see `FileConfig::last_gasp`).
    pub last_gasp: Vec<PathBuf>,
    /// Critical revisions to /dev/kmsg.
    pub kmsg: bool,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// `self` with every key set in `over` replaced (flags over the file).
    pub fn overlay(self, over: FileConfig) -> FileConfig {
        FileConfig {
            listen: over.listen.or(self.listen),
            spool: over.spool.or(self.spool),
            spool_max_bytes: over.spool_max_bytes.or(self.spool_max_bytes),
            alertmanager_urls: over.alertmanager_urls.or(self.alertmanager_urls),
            stdout: over.stdout.or(self.stdout),
            replay: over.replay.or(self.replay),
            simulate: over.simulate.or(self.simulate),
            seed: over.seed.or(self.seed),
            rate: over.rate.or(self.rate),
            max_pending: over.max_pending.or(self.max_pending),
            last_gasp: over.last_gasp.or(self.last_gasp),
            kmsg: over.kmsg.or(self.kmsg),
        }
    }

    /// Checks the values and fills in defaults.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let listen_s = self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = resolve_listen(&listen_s)?;
        let spool_max_bytes = self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES);
        if spool_max_bytes < 4096 {
            return Err(ConfigError::Invalid(format!(
                "spool_max_bytes {spool_max_bytes} is below 4096"
            )));
        }
        let urls = self.alertmanager_urls.unwrap_or_default();
        for u in &urls {
            super::http::parse_http_url(u)
                .map_err(|e| ConfigError::Invalid(format!("alertmanager url {u:?}: {e}")))?;
        }
        let source = match (self.replay, self.simulate) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "replay and simulate are exclusive: choose one source".into(),
                ))
            }
            (Some(p), None) => SourceConfig::Replay(p),
            (None, Some(s)) => {
                if !crate::simulate::stream::is_endless(&s) {
                    crate::simulate::generate(&s, 0)
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
                }
                SourceConfig::Simulate {
                    scenario: s,
                    seed: self.seed.unwrap_or(0),
                }
            }
            (None, None) => SourceConfig::Live,
        };
        if self.rate == Some(0) {
            return Err(ConfigError::Invalid(
                "rate 0: leave it out to play the source as fast as possible".into(),
            ));
        }
        if self.rate.is_some() && source == SourceConfig::Live {
            return Err(ConfigError::Invalid(
                "rate paces --replay or --simulate; the live probes come at their own rate".into(),
            ));
        }
        let max_pending = self.max_pending.unwrap_or(DEFAULT_MAX_PENDING);
        if max_pending == 0 {
            return Err(ConfigError::Invalid(
                "max_pending must be at least 1".into(),
            ));
        }
        Ok(Config {
            listen,
            spool: self.spool,
            spool_max_bytes,
            alertmanager_urls: urls,
            stdout: self.stdout.unwrap_or(true),
            source,
            rate: self.rate,
            max_pending: usize::try_from(max_pending).unwrap_or(usize::MAX),
            last_gasp: self.last_gasp.unwrap_or_default(),
            kmsg: self.kmsg.unwrap_or(false),
        })
    }
}

/// `ADDR:PORT`, or `HOST:PORT` resolved (`localhost:9464`); the first address the resolver
/// gives is the one served.
fn resolve_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs() {
        Ok(mut it) => it.next().ok_or_else(|| {
            ConfigError::Invalid(format!("listen {s:?}: the name resolves to no address"))
        }),
        Err(e) => Err(ConfigError::Invalid(format!(
            "listen {s:?} is not ADDR:PORT or HOST:PORT: {e}"
        ))),
    }
}

/// What `--check-config` checks beyond the values themselves: that the agent could start with
/// them now. The listen address can be bound (not in use), the spool is a directory (or can
/// be created under an existing one), a replayed trace can be read. Returns every problem.
pub fn check_startable(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = std::net::TcpListener::bind(cfg.listen) {
        problems.push(format!("listen {}: cannot bind: {e}", cfg.listen));
    }
    if let Some(dir) = &cfg.spool {
        match std::fs::metadata(dir) {
            Ok(m) if !m.is_dir() => problems.push(format!(
                "spool {}: exists and is not a directory",
                dir.display()
            )),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let parent = dir
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                if !parent.is_dir() {
                    problems.push(format!(
                        "spool {}: does not exist, and neither does its parent {}",
                        dir.display(),
                        parent.display()
                    ));
                }
            }
            Err(e) => problems.push(format!("spool {}: cannot read: {e}", dir.display())),
        }
    }
    if let SourceConfig::Replay(p) = &cfg.source {
        if let Err(e) = std::fs::File::open(p) {
            problems.push(format!("replay {}: cannot read: {e}", p.display()));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_takes_a_host_name() {
        let c = FileConfig {
            listen: Some("localhost:9464".into()),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert!(c.listen.ip().is_loopback(), "{}", c.listen);
        assert_eq!(c.listen.port(), 9464);
    }

    #[test]
    fn check_config_refuses_what_would_stop_the_agent_at_start() {
        let d = tempfile::tempdir().unwrap();
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let file = d.path().join("spool-file");
        std::fs::write(&file, b"x").unwrap();
        let c = FileConfig {
            listen: Some(busy.local_addr().unwrap().to_string()),
            spool: Some(file),
            replay: Some(d.path().join("missing.itw")),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let p = check_startable(&c);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("cannot bind"), "{p:?}");
        assert!(p[1].contains("not a directory"), "{p:?}");
        assert!(p[2].contains("missing.itw"), "{p:?}");
        let ok = FileConfig {
            listen: Some("127.0.0.1:0".into()),
            spool: Some(d.path().join("new-spool")),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert!(check_startable(&ok).is_empty());
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_in() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:1\"\nalertmanager_urls = [\"http://127.0.0.1:9093\"]\nseed = 3",
        )
        .unwrap();
        let flags = FileConfig {
            listen: Some("127.0.0.1:2".into()),
            simulate: Some("benign".into()),
            ..Default::default()
        };
        let c = file.overlay(flags).validate().unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.alertmanager_urls, vec!["http://127.0.0.1:9093"]);
        assert_eq!(
            c.source,
            SourceConfig::Simulate {
                scenario: "benign".into(),
                seed: 3
            }
        );
        assert_eq!(c.spool_max_bytes, DEFAULT_SPOOL_MAX_BYTES);
        assert!(c.stdout);
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |f: FileConfig| f.validate().unwrap_err().to_string();
        assert!(bad(FileConfig {
            listen: Some("nope".into()),
            ..Default::default()
        })
        .contains("listen"));
        assert!(bad(FileConfig {
            alertmanager_urls: Some(vec!["https://am:9093".into()]),
            ..Default::default()
        })
        .contains("alertmanager url"));
        assert!(bad(FileConfig {
            simulate: Some("no-such".into()),
            ..Default::default()
        })
        .contains("no-such"));
        assert!(toml::from_str::<FileConfig>("typo = 1").is_err());
        assert!(bad(FileConfig {
            simulate: Some(SOAK.into()),
            rate: Some(0),
            ..Default::default()
        })
        .contains("rate 0"));
        assert!(bad(FileConfig {
            rate: Some(1000),
            ..Default::default()
        })
        .contains("live probes"));
        assert!(bad(FileConfig {
            max_pending: Some(0),
            ..Default::default()
        })
        .contains("max_pending"));
    }

    #[test]
    fn soak_rate_and_pending_bound() {
        let c = FileConfig {
            simulate: Some(SOAK.into()),
            rate: Some(100_000),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.rate, Some(100_000));
        assert_eq!(c.max_pending, DEFAULT_MAX_PENDING as usize);
        let f: FileConfig = toml::from_str("max_pending = 5").unwrap();
        assert_eq!(f.validate().unwrap().max_pending, 5);
    }
}
