//! Addresses and URLs: where to listen, where upstreams and the app are, where to resolve.
//! Parsed strictly (IP:PORT for listeners, http URLs without credentials or queries) so that a
//! typo fails `outrigger validate` instead of the first connection attempt.

use super::{ValueError, is_host, redact, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// A socket address to listen on: `IP:PORT`, `[::1]:4140`. A host name is refused: which
/// interface it means could change under a running sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct ListenAddr(SocketAddr);

/// A DNS server: `IP:PORT`, or an `IP` alone for port 53.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct NameServer(SocketAddr);

/// A static endpoint: `HOST:PORT`, where HOST is an IP (`[v6]` in brackets) or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    host: String,
    port: u16,
}

/// The local application's base URL: `http://HOST[:PORT][/base]` (port 80 when absent).
/// Plain http only: the app is on loopback, beside the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct AppUrl(HttpUrl);

/// `http(s)://HOST[:PORT][/path]`, the URL shape every URL field shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: Option<u16>,
    pub(crate) path: String,
}

// === impl ListenAddr ===

impl ListenAddr {
    pub(crate) const fn new(ip: Ipv4Addr, port: u16) -> Self {
        ListenAddr(SocketAddr::new(IpAddr::V4(ip), port))
    }

    pub fn get(self) -> SocketAddr {
        self.0
    }
}

impl FromStr for ListenAddr {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        text.parse().map(ListenAddr).map_err(|_| {
            ValueError::new(format!("{text:?} is not an address"), "IP:PORT, e.g. 127.0.0.1:4140")
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === impl NameServer ===

impl NameServer {
    pub fn get(self) -> SocketAddr {
        self.0
    }
}

impl FromStr for NameServer {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let with_port = text.parse::<SocketAddr>();
        let ip_only = text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53));
        with_port.or(ip_only).map(NameServer).map_err(|_| {
            ValueError::new(
                format!("{text:?} is not an address"),
                "IP or IP:PORT, e.g. 10.0.0.10:53",
            )
        })
    }
}

impl fmt::Display for NameServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// === impl Endpoint ===

impl Endpoint {
    /// The IP or DNS name, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for Endpoint {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        split_host_port(text)
            .and_then(|(host, port)| Some(Endpoint { host, port: port?.parse().ok()? }))
            .filter(|e| e.port != 0)
            .ok_or_else(|| {
                ValueError::new(
                    format!("{:?} is not an endpoint", redact(text)),
                    "HOST:PORT, e.g. 10.0.0.7:8080 or payments.internal:8080",
                )
            })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// `host:port`, `[v6]:port`, or a host alone; the port is returned unparsed.
pub(super) fn split_host_port(text: &str) -> Option<(String, Option<&str>)> {
    let (host, port) = match text.strip_prefix('[') {
        Some(bracketed) => {
            let (v6, after) = bracketed.split_once(']')?;
            v6.parse::<std::net::Ipv6Addr>().ok()?;
            match after {
                "" => (v6, None),
                _ => (v6, Some(after.strip_prefix(':')?)),
            }
        }
        None => match text.split_once(':') {
            // An IPv6 address needs its brackets, or its last group would read as the port.
            Some((_, port)) if port.contains(':') => return None,
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        },
    };
    let digits = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    (is_host(host) && digits).then(|| (host.to_owned(), port))
}

// === impl HttpUrl ===

impl HttpUrl {
    /// None for anything but `http(s)://HOST[:PORT][/path]`: no credentials, query or fragment.
    pub(crate) fn parse(text: &str) -> Option<HttpUrl> {
        let (https, rest) = match text.split_once("://")? {
            ("http", rest) => (false, rest),
            ("https", rest) => (true, rest),
            _ => return None,
        };
        if rest.contains(['@', '?', '#', ' ']) {
            return None;
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        let (host, port) = split_host_port(authority)?;
        let port = match port {
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
            None => None,
        };
        Some(HttpUrl { https, host, port, path: path.trim_end_matches('/').to_owned() })
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]", self.host)?,
            false => write!(f, "{scheme}://{}", self.host)?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        f.write_str(&self.path)
    }
}

// === impl AppUrl ===

impl AppUrl {
    pub fn host(&self) -> &str {
        &self.0.host
    }

    pub fn port(&self) -> u16 {
        self.0.port.unwrap_or(80)
    }

    /// The path prefix for every request to the app: empty, or `/base` (no trailing slash).
    pub fn base_path(&self) -> &str {
        &self.0.path
    }
}

impl FromStr for AppUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        HttpUrl::parse(text).filter(|url| !url.https).map(AppUrl).ok_or_else(|| {
            ValueError::new(
                format!("{:?} is not an app URL", redact(text)),
                "http://HOST:PORT[/base], e.g. http://127.0.0.1:8080",
            )
        })
    }
}

impl fmt::Display for AppUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

string_conversions!(ListenAddr, NameServer, Endpoint, AppUrl);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_are_ip_and_port() {
        assert_eq!("[::1]:4140".parse::<ListenAddr>().unwrap().to_string(), "[::1]:4140");
        let err = "localhost:4140".parse::<ListenAddr>().unwrap_err().to_string();
        assert_eq!(
            err,
            r#""localhost:4140" is not an address (expected IP:PORT, e.g. 127.0.0.1:4140)"#
        );
        assert_eq!("10.0.0.10".parse::<NameServer>().unwrap().to_string(), "10.0.0.10:53");
    }

    #[test]
    fn endpoints_take_ips_and_names() {
        for (text, host, port) in [
            ("127.0.0.1:9001", "127.0.0.1", 9001),
            ("payments.internal:8080", "payments.internal", 8080),
            ("[::1]:80", "::1", 80),
        ] {
            let e: Endpoint = text.parse().unwrap();
            assert_eq!((e.host(), e.port(), e.to_string().as_str()), (host, port, text));
        }
        for bad in ["payments", "x:0", "x:99999", ":80", "a b:80", "[::1]", "::1:80"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn app_urls_are_plain_http() {
        let url: AppUrl = "http://127.0.0.1:8080/base/".parse().unwrap();
        assert_eq!((url.host(), url.port(), url.base_path()), ("127.0.0.1", 8080, "/base"));
        assert_eq!(url.to_string(), "http://127.0.0.1:8080/base");
        assert_eq!("http://app".parse::<AppUrl>().unwrap().port(), 80);
        for bad in ["https://app:443", "127.0.0.1:8080", "http://u:p@app", "http://app:8080?x"] {
            assert!(bad.parse::<AppUrl>().is_err(), "{bad}");
        }
    }
}
