//! Where spans go: `telemetry.tracing` and the standard OpenTelemetry variables, the YAML
//! winning field by field. The same answer serves `validate`, `check` and the running sidecar.
//!
//! - The URL: `otlp_endpoint` + `/v1/traces`, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it
//!   is, else `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces` (the specification's rules).
//! - Without `telemetry.tracing`, one of those variables turns export on (a platform that sets
//!   them on every Pod gets the sidecar's spans too), unless `OTEL_SDK_DISABLED=true`,
//!   `OTEL_TRACES_EXPORTER=none`, or the protocol variable asks for gRPC (the exporter speaks
//!   OTLP/HTTP; with a `tracing` section relying on the variables, that is an error).
//! - `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are read
//!   by the exporter (the OpenTelemetry crates parse them); `headers` and `service_name` here
//!   are laid over them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Telemetry, Tracing};
use crate::types::HttpUrl;

/// Spans are exported: where, and with what.
#[derive(Debug, Clone, PartialEq)]
pub struct Export {
    /// The URL export requests are POSTed to, `…/v1/traces`.
    pub url: String,
    /// Where the URL came from: a field or a variable, for messages.
    pub url_from: &'static str,
    pub sample_ratio: f64,
    /// `telemetry.tracing.service_name`: over the variables and `service.name`.
    pub service_name: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// Over `OTEL_EXPORTER_OTLP_HEADERS`, name by name.
    pub headers: BTreeMap<String, String>,
}

/// Why the export settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error(
        "no collector: set telemetry.tracing.otlp_endpoint, or {ENDPOINT} in the sidecar's environment"
    )]
    Missing,
    #[error("{from}: {value:?} is not an http(s) URL")]
    NotAUrl { from: &'static str, value: String },
    #[error(
        "{var}=grpc: Outrigger exports OTLP over HTTP only; set telemetry.tracing.otlp_endpoint to the collector's OTLP/HTTP port (4318)"
    )]
    Grpc { var: &'static str },
}

const FIELD: &str = "telemetry.tracing.otlp_endpoint";
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
/// What the specification appends to a base endpoint for traces.
const TRACES_PATH: &str = "/v1/traces";

impl Telemetry {
    /// Whether and where spans are exported, asking `env` for the OpenTelemetry variables.
    pub fn export(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Export>, ExportError> {
        let vars = Vars(env);
        let ((url, url_from, written), tracing) = match &self.tracing {
            Some(tracing) => {
                let yaml =
                    tracing.otlp_endpoint.clone().map(|base| (traces_url(&base), FIELD, base));
                let found = match yaml {
                    Some(found) => found,
                    None => {
                        let found = vars.endpoint().ok_or(ExportError::Missing)?;
                        if let Some(var) = vars.grpc() {
                            return Err(ExportError::Grpc { var });
                        }
                        found
                    }
                };
                (found, tracing.clone())
            }
            None => match vars.endpoint() {
                Some(found) if vars.off().is_none() && vars.grpc().is_none() => {
                    (found, Tracing::default())
                }
                _ => return Ok(None),
            },
        };
        if HttpUrl::parse(&url).is_none() {
            return Err(ExportError::NotAUrl { from: url_from, value: written });
        }
        Ok(Some(Export {
            url,
            url_from,
            sample_ratio: tracing.sample_ratio.get(),
            service_name: tracing.service_name,
            ca_file: tracing.ca_file,
            headers: tracing.headers,
        }))
    }

    /// Why an endpoint variable is set but no span is exported, when that is so: for a line
    /// in the log at start, so that a platform's variables are not ignored in silence.
    pub fn unused_endpoint(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        let vars = Vars(env);
        let (_, from, _) = vars.endpoint().filter(|_| self.tracing.is_none())?;
        if let Some(off) = vars.off() {
            return Some(format!("{from} is set, but {off}: spans are not exported"));
        }
        let var = vars.grpc()?;
        Some(format!(
            "{from} is set, but {var}=grpc: Outrigger exports OTLP over HTTP only, so spans are \
             not exported; set telemetry.tracing.otlp_endpoint to the collector's OTLP/HTTP port (4318)"
        ))
    }
}

/// The OpenTelemetry variables, as `env` gives them.
struct Vars<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Vars<'_> {
    /// A variable's value, trimmed; `None` when unset or empty.
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    }

    /// The URL the variables name, the variable, and its value as written.
    fn endpoint(&self) -> Option<(String, &'static str, String)> {
        match (self.get(TRACES_ENDPOINT), self.get(ENDPOINT)) {
            (Some(url), _) => Some((url.clone(), TRACES_ENDPOINT, url)),
            (None, Some(base)) => Some((traces_url(&base), ENDPOINT, base)),
            (None, None) => None,
        }
    }

    /// The variable that turns export off, written as it is set.
    fn off(&self) -> Option<&'static str> {
        let is = |name, value: &str| self.get(name).is_some_and(|v| v.eq_ignore_ascii_case(value));
        if is("OTEL_SDK_DISABLED", "true") {
            Some("OTEL_SDK_DISABLED=true")
        } else if is("OTEL_TRACES_EXPORTER", "none") {
            Some("OTEL_TRACES_EXPORTER=none")
        } else {
            None
        }
    }

    /// The protocol variable asking for gRPC, which the exporter does not speak.
    fn grpc(&self) -> Option<&'static str> {
        let protocol = self.get(TRACES_PROTOCOL).map(|v| (TRACES_PROTOCOL, v));
        let (var, value) = protocol.or_else(|| self.get(PROTOCOL).map(|v| (PROTOCOL, v)))?;
        value.eq_ignore_ascii_case("grpc").then_some(var)
    }
}

/// `base` + `/v1/traces`, one slash between.
fn traces_url(base: &str) -> String {
    format!("{}{TRACES_PATH}", base.trim_end_matches('/'))
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            otlp_endpoint: None,
            sample_ratio: Tracing::default_sample_ratio(),
            service_name: None,
            ca_file: None,
            headers: BTreeMap::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry(tracing: Option<Tracing>) -> Telemetry {
        Telemetry { tracing, ..Telemetry::default() }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    }

    fn url(t: &Telemetry, vars: &[(&str, &str)]) -> Option<String> {
        t.export(&env(vars)).unwrap().map(|e| e.url)
    }

    #[test]
    fn the_yaml_endpoint_wins_then_the_traces_variable_then_the_base_variable() {
        let yaml =
            Tracing { otlp_endpoint: Some("http://yaml:4318/".into()), ..Tracing::default() };
        let both =
            [(TRACES_ENDPOINT, "https://traces:4318/custom"), (ENDPOINT, "http://base:4318")];
        assert_eq!(
            url(&telemetry(Some(yaml)), &both).as_deref(),
            Some("http://yaml:4318/v1/traces")
        );
        let bare = telemetry(Some(Tracing::default()));
        assert_eq!(url(&bare, &both).as_deref(), Some("https://traces:4318/custom"));
        assert_eq!(url(&bare, &both[1..]).as_deref(), Some("http://base:4318/v1/traces"));
    }

    #[test]
    fn without_the_section_a_variable_turns_export_on_unless_disabled() {
        let none = telemetry(None);
        assert_eq!(url(&none, &[]), None);
        let base = (ENDPOINT, "http://collector:4318");
        assert_eq!(url(&none, &[base]).as_deref(), Some("http://collector:4318/v1/traces"));
        assert_eq!(url(&none, &[base, ("OTEL_SDK_DISABLED", "TRUE")]), None);
        assert_eq!(url(&none, &[base, ("OTEL_TRACES_EXPORTER", "none")]), None);
        // the YAML section is an explicit choice: the kill switches are for the variables
        let on = telemetry(Some(Tracing::default()));
        assert!(url(&on, &[base, ("OTEL_SDK_DISABLED", "true")]).is_some());
    }

    #[test]
    fn a_section_without_any_endpoint_or_with_a_bad_one_is_refused_naming_its_source() {
        let bare = telemetry(Some(Tracing::default()));
        assert_eq!(bare.export(&env(&[])), Err(ExportError::Missing));
        let bad = Tracing { otlp_endpoint: Some("collector:4318".into()), ..Tracing::default() };
        let error = telemetry(Some(bad)).export(&env(&[])).unwrap_err();
        assert_eq!(error.to_string(), format!("{FIELD}: \"collector:4318\" is not an http(s) URL"));
        let error = telemetry(None).export(&env(&[(ENDPOINT, "grpc://x:4317")])).unwrap_err();
        assert_eq!(error, ExportError::NotAUrl { from: ENDPOINT, value: "grpc://x:4317".into() });
    }

    #[test]
    fn a_grpc_protocol_variable_keeps_the_variables_endpoint_unused_and_says_so() {
        let vars = [(ENDPOINT, "http://collector:4317"), (PROTOCOL, "grpc")];
        let none = telemetry(None);
        assert_eq!(url(&none, &vars), None);
        assert!(
            none.unused_endpoint(&env(&vars)).unwrap().contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc")
        );
        let relying = telemetry(Some(Tracing::default()));
        assert_eq!(relying.export(&env(&vars)), Err(ExportError::Grpc { var: PROTOCOL }));
        // the YAML's endpoint is the YAML's choice: HTTP
        let yaml =
            Tracing { otlp_endpoint: Some("http://collector:4318".into()), ..Tracing::default() };
        assert!(url(&telemetry(Some(yaml)), &vars).is_some());
        // nothing to say when export is on, or no variable names an endpoint
        assert_eq!(none.unused_endpoint(&env(&vars[..1])), None);
        assert_eq!(none.unused_endpoint(&env(&vars[1..])), None);
        let off = [(ENDPOINT, "http://c:4318"), ("OTEL_SDK_DISABLED", "true")];
        assert!(none.unused_endpoint(&env(&off)).unwrap().contains("OTEL_SDK_DISABLED=true"));
    }
}
