//! The app's PostgreSQL (`messaging.app_outbox`): its URL, whose password never prints, and the
//! outbox table's name, checked so that it can be written into SQL as it is.

use super::{ValueError, is_host, redact, string_conversions};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// `postgres[ql]://[USER[:PASSWORD]@]HOST[:PORT][/DATABASE][?PARAMS]`, without TLS.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct PostgresUrl(String);

impl PostgresUrl {
    /// The URL as written, password included: for the client, never for a log.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PostgresUrl {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let text = text.trim();
        let expected = "postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
        let rest = text.strip_prefix("postgres://").or_else(|| text.strip_prefix("postgresql://"));
        let Some(rest) = rest else {
            return Err(ValueError::new(
                format!("{:?} is not a PostgreSQL URL", redact(text)),
                expected,
            ));
        };
        let (rest, params) = rest.split_once('?').unwrap_or((rest, ""));
        let authority = rest.split_once('/').map_or(rest, |(authority, _)| authority);
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
        let host_ok = |h: &str| {
            let (host, port) = match h.strip_prefix('[') {
                Some(v6) => v6.split_once(']').map_or((h, ""), |(ip, p)| (ip, p)),
                None => h.rsplit_once(':').map_or((h, ""), |(host, port)| (host, port)),
            };
            let port = port.strip_prefix(':').unwrap_or(port);
            is_host(host) && (port.is_empty() || port.parse::<u16>().is_ok_and(|p| p != 0))
        };
        if hosts.is_empty() || !hosts.split(',').all(host_ok) {
            return Err(ValueError::new(
                format!("{:?} names no host to connect to", redact(text)),
                expected,
            ));
        }
        let tls = params.split('&').find_map(|p| p.strip_prefix("sslmode="));
        if let Some(mode @ ("require" | "verify-ca" | "verify-full")) = tls {
            return Err(ValueError::new(
                format!("sslmode={mode} is refused: TLS to PostgreSQL is not supported yet"),
                "sslmode=disable or prefer, with the database on a trusted network (the pod, or its node)",
            ));
        }
        Ok(PostgresUrl(text.to_owned()))
    }
}

/// The URL with its password replaced by `***`.
impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({self})")
    }
}

/// A table, `name` or `schema.name`: lowercase letters, digits and `_`, not starting with a
/// digit, at most 63 each, as PostgreSQL folds an unquoted name. Safe to write into SQL quoted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct TableName(String);

impl TableName {
    /// The name as SQL quotes it: `"schema"."name"`.
    pub fn quoted(&self) -> String {
        self.0.split('.').map(|part| format!("\"{part}\"")).collect::<Vec<_>>().join(".")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TableName {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, ValueError> {
        let part_ok = |p: &str| {
            (1..=63).contains(&p.len())
                && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        let parts: Vec<&str> = text.split('.').collect();
        match parts.len() <= 2 && parts.iter().all(|p| part_ok(p)) {
            true => Ok(TableName(text.to_owned())),
            false => Err(ValueError::new(
                format!("{text:?} is not a table name"),
                "outrigger_outbox or app.outrigger_outbox: lowercase letters, digits and _",
            )),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_conversions!(PostgresUrl, TableName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_password_never_prints() {
        let url: PostgresUrl = "postgres://app:s3cret@db.internal:5432/shop".parse().unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@db.internal:5432/shop");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(url.as_str().contains("s3cret"));
    }

    #[test]
    fn postgres_urls_are_checked() {
        for good in [
            "postgres://app@127.0.0.1:5432/shop",
            "postgresql://localhost/shop?sslmode=disable",
            "postgres://app@db-1:5432,db-2:5433/shop",
            "postgres://[::1]:5432/shop",
        ] {
            assert!(good.parse::<PostgresUrl>().is_ok(), "{good}");
        }
        for bad in [
            "mysql://localhost/shop",
            "postgres://",
            "postgres://app@/shop",
            "postgres://db:0/shop",
            "postgres://db:5432/shop?sslmode=require",
        ] {
            let error = bad.parse::<PostgresUrl>().unwrap_err();
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
        let tls = "postgres://db/shop?sslmode=verify-full".parse::<PostgresUrl>().unwrap_err();
        assert!(tls.to_string().contains("TLS to PostgreSQL is not supported"), "{tls}");
    }

    #[test]
    fn table_names_are_quoted_and_checked() {
        let table: TableName = "app.outrigger_outbox".parse().unwrap();
        assert_eq!(table.quoted(), "\"app\".\"outrigger_outbox\"");
        for bad in ["", "Outbox", "a.b.c", "1st", "x\"; drop table y; --", "a..b"] {
            assert!(bad.parse::<TableName>().is_err(), "{bad}");
        }
    }
}
