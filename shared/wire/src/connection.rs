//! How a service reaches NATS: the servers, the credentials, TLS and the
//! replication of what it creates, read once from the environment.
//!
//! Every service reads the same variables (README, "Settings"), so a
//! deployment configures the bus in one place. Secrets (passwords, tokens,
//! seeds) live only here and in the connection; `Debug` and every error
//! message redact them.

use std::fmt;
use std::path::PathBuf;

use async_nats::ServerAddr;
use telemetry::env::{self, EnvError};

/// The default server when `NATS_URL` is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// What `NATS_*` says about the bus.
#[derive(Clone)]
pub struct NatsSettings {
    /// `NATS_URL`: one or more servers; the client picks one and fails over
    /// to the others (and to the servers the cluster announces).
    pub servers: Vec<ServerAddr>,
    pub auth: Auth,
    pub tls: Tls,
    /// `NATS_STREAM_REPLICAS`: replicas of every stream and key-value bucket
    /// this service creates or updates (1 on a single server, 3 on a cluster).
    pub stream_replicas: usize,
}

/// How the connection authenticates (at most one way).
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials: only for a server without authorization.
    #[default]
    None,
    /// `NATS_USER` + `NATS_PASSWORD`.
    UserPassword { user: String, password: String },
    /// `NATS_TOKEN`.
    Token(String),
    /// `NATS_NKEY_SEED_FILE`: a file holding the user's nkey seed (`SU…`).
    NkeySeed { file: PathBuf, seed: String },
    /// `NATS_CREDS_FILE`: a `.creds` file (user JWT + seed, decentralized auth).
    CredsFile(PathBuf),
}

impl Auth {
    /// The method's name for logs (never the secret).
    pub fn method(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::UserPassword { .. } => "user_password",
            Self::Token(_) => "token",
            Self::NkeySeed { .. } => "nkey",
            Self::CredsFile(_) => "creds_file",
        }
    }
}

/// TLS to the server (`NATS_TLS_*`).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// `NATS_TLS_CA_FILE`: PEM CA that signed the servers' certificates.
    /// Setting it (or a `tls://` URL) makes TLS required.
    pub ca_file: Option<PathBuf>,
    /// `NATS_TLS_CERT_FILE` + `NATS_TLS_KEY_FILE`: a client certificate, for
    /// servers that verify clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `NATS_TLS_REQUIRED`: refuse a plaintext connection even without a CA
    /// file (system roots are then used).
    pub required: bool,
}

impl Tls {
    pub fn enabled(&self) -> bool {
        self.required || self.ca_file.is_some() || self.client_cert.is_some()
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, <redacted>)"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::NkeySeed { file, .. } => write!(f, "NkeySeed({})", file.display()),
            Self::CredsFile(path) => write!(f, "CredsFile({})", path.display()),
        }
    }
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("servers", &self.servers_display())
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("stream_replicas", &self.stream_replicas)
            .finish()
    }
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            servers: parse_servers(DEFAULT_URL).unwrap_or_default(),
            auth: Auth::None,
            tls: Tls::default(),
            stream_replicas: 1,
        }
    }
}

impl NatsSettings {
    /// One server, no credentials, one replica: what tests against their own
    /// nats-server use.
    pub fn for_url(url: &str) -> Result<Self, EnvError> {
        Ok(Self {
            servers: parse_servers(url)?,
            ..Self::default()
        })
    }

    /// Reads `NATS_URL`, the credential variables, `NATS_TLS_*` and
    /// `NATS_STREAM_REPLICAS`. A malformed value, a missing file or two
    /// credential methods at once is an error naming the variable.
    pub fn from_env() -> Result<Self, EnvError> {
        let servers = parse_servers(&env::string_or("NATS_URL", DEFAULT_URL))?;
        let stream_replicas: usize = env::parse_or("NATS_STREAM_REPLICAS", 1)?;
        // JetStream's limit: R1, R3 or R5 are the useful ones, 1..=5 the legal ones.
        if !(1..=5).contains(&stream_replicas) {
            return Err(EnvError::new(
                "NATS_STREAM_REPLICAS",
                &stream_replicas.to_string(),
                "must be between 1 and 5 (JetStream's limit; 3 on a 3-node cluster)",
            ));
        }
        let auth = auth_from_env()?;
        let tls = Tls {
            ca_file: readable_file("NATS_TLS_CA_FILE")?,
            client_cert: match (
                readable_file("NATS_TLS_CERT_FILE")?,
                readable_file("NATS_TLS_KEY_FILE")?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                (Some(_), None) => return Err(EnvError::missing("NATS_TLS_KEY_FILE")),
                (None, Some(_)) => return Err(EnvError::missing("NATS_TLS_CERT_FILE")),
            },
            required: env::flag("NATS_TLS_REQUIRED", false)?,
        };
        Ok(Self {
            servers,
            auth,
            tls,
            stream_replicas,
        })
    }

    /// The servers as `host:port` list for logs and errors: no user info.
    pub fn servers_display(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("{}://{}:{}", s.scheme(), s.host(), s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The connect options these settings describe (credentials, TLS).
    pub async fn connect_options(&self) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options = async_nats::ConnectOptions::new();
        options = match &self.auth {
            Auth::None => options,
            Auth::UserPassword { user, password } => {
                options.user_and_password(user.clone(), password.clone())
            }
            Auth::Token(token) => options.token(token.clone()),
            Auth::NkeySeed { seed, .. } => options.nkey(seed.clone()),
            Auth::CredsFile(path) => options
                .credentials_file(path)
                .await
                .map_err(|e| anyhow::anyhow!("reading NATS_CREDS_FILE {}: {e}", path.display()))?,
        };
        if let Some(ca) = &self.tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls.enabled() {
            options = options.require_tls(true);
        }
        Ok(options)
    }
}

/// Parses a comma-separated `NATS_URL` (`nats://`, `tls://`, or a bare
/// `host:port`). The error names the entry without its password.
pub fn parse_servers(raw: &str) -> Result<Vec<ServerAddr>, EnvError> {
    let mut servers = Vec::new();
    for (index, entry) in raw.split(',').map(str::trim).enumerate() {
        if entry.is_empty() {
            return Err(EnvError::new(
                "NATS_URL",
                &redact_url(raw),
                format!(
                    "entry {} is empty (servers are separated by single commas)",
                    index + 1
                ),
            ));
        }
        let server: ServerAddr = entry.parse().map_err(|e: std::io::Error| {
            EnvError::new(
                "NATS_URL",
                &redact_url(raw),
                format!("entry {} ({}): {e}", index + 1, redact_url(entry)),
            )
        })?;
        if server.host().is_empty() {
            return Err(EnvError::new(
                "NATS_URL",
                &redact_url(raw),
                format!("entry {} ({}) names no host", index + 1, redact_url(entry)),
            ));
        }
        servers.push(server);
    }
    Ok(servers)
}

/// `nats://user:secret@host` → `nats://user:<redacted>@host`, for every
/// comma-separated entry; anything else is left as it is.
pub fn redact_url(raw: &str) -> String {
    raw.split(',')
        .map(|entry| {
            let Some((scheme, rest)) = entry.split_once("://") else {
                return entry.to_owned();
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return entry.to_owned();
            };
            let user = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:<redacted>"),
                // A lone userinfo is a token.
                None => "<redacted>".to_owned(),
            };
            format!("{scheme}://{user}@{host}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn auth_from_env() -> Result<Auth, EnvError> {
    let user = env::raw("NATS_USER");
    let password = env::raw("NATS_PASSWORD");
    let token = env::raw("NATS_TOKEN");
    let seed_file = readable_file("NATS_NKEY_SEED_FILE")?;
    let creds_file = readable_file("NATS_CREDS_FILE")?;

    let chosen: Vec<&str> = [
        (
            user.is_some() || password.is_some(),
            "NATS_USER/NATS_PASSWORD",
        ),
        (token.is_some(), "NATS_TOKEN"),
        (seed_file.is_some(), "NATS_NKEY_SEED_FILE"),
        (creds_file.is_some(), "NATS_CREDS_FILE"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
    .collect();
    if chosen.len() > 1 {
        return Err(EnvError::new(
            chosen[1],
            "<redacted>",
            format!(
                "only one NATS credential may be set, found {}",
                chosen.join(" and ")
            ),
        ));
    }
    if let (Some(_), None) = (&user, &password) {
        return Err(EnvError::missing("NATS_PASSWORD"));
    }
    if let (None, Some(_)) = (&user, &password) {
        return Err(EnvError::missing("NATS_USER"));
    }
    Ok(match (user, password, token, seed_file, creds_file) {
        (Some(user), Some(password), ..) => Auth::UserPassword { user, password },
        (_, _, Some(token), ..) => Auth::Token(token),
        (_, _, _, Some(file), _) => {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                EnvError::new("NATS_NKEY_SEED_FILE", &file.display().to_string(), e)
            })?;
            // The seed is the first non-empty line (`nk -gen user` writes one
            // line; a `.nk` file may have a trailing newline).
            let seed = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or_default()
                .to_owned();
            if !seed.starts_with("SU") {
                return Err(EnvError::new(
                    "NATS_NKEY_SEED_FILE",
                    &file.display().to_string(),
                    "does not hold a user nkey seed (a line starting with SU)",
                ));
            }
            Auth::NkeySeed { file, seed }
        }
        (.., Some(file)) => Auth::CredsFile(file),
        _ => Auth::None,
    })
}

/// A path setting that must name a readable file.
fn readable_file(var: &str) -> Result<Option<PathBuf>, EnvError> {
    let Some(raw) = env::raw(var) else {
        return Ok(None);
    };
    let path = PathBuf::from(raw.trim());
    std::fs::File::open(&path).map_err(|e| EnvError::new(var, &path.display().to_string(), e))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_servers_are_parsed() {
        let servers = parse_servers("nats://10.0.0.1:4222, nats-2:4223,tls://n3.example:4224")
            .expect("three servers");
        let hosts: Vec<_> = servers.iter().map(|s| (s.host(), s.port())).collect();
        assert_eq!(
            hosts,
            [("10.0.0.1", 4222), ("nats-2", 4223), ("n3.example", 4224)]
        );
        assert!(servers[2].tls_required());
    }

    #[test]
    fn a_bad_entry_names_nats_url_and_the_entry() {
        for (raw, expected) in [
            ("nats://a:4222,,nats://b:4222", "entry 2 is empty"),
            ("nats://a:4222,http://b:4222", "entry 2 (http://b:4222)"),
            ("nats://a:4222,nats://b:notaport", "entry 2"),
            ("nats://a:4222,", "entry 2 is empty"),
        ] {
            let err = parse_servers(raw).expect_err(raw);
            assert_eq!(err.var, "NATS_URL", "{raw}");
            assert!(err.to_string().contains(expected), "{raw}: {err}");
        }
    }

    #[test]
    fn passwords_in_urls_never_reach_errors() {
        let err = parse_servers("nats://svc:hunter2@a:4222,nats://svc:hunter2@b:bad")
            .expect_err("bad port");
        let text = err.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("svc:<redacted>@"), "{text}");
        assert_eq!(redact_url("nats://s3cret@h:1"), "nats://<redacted>@h:1");
        assert_eq!(redact_url("nats://h:1"), "nats://h:1");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let settings = NatsSettings {
            servers: parse_servers("nats://u:pw-secret@h:4222").expect("url"),
            auth: Auth::UserPassword {
                user: "gateway".to_owned(),
                password: "pw-secret".to_owned(),
            },
            ..NatsSettings::default()
        };
        let text = format!("{settings:?}");
        assert!(!text.contains("pw-secret"), "{text}");
        assert!(text.contains("gateway"), "{text}");
        let token = format!("{:?}", Auth::Token("tok-secret".to_owned()));
        assert!(!token.contains("tok-secret"), "{token}");
    }
}
