//! Typed configuration from a TOML file plus `VITALWATCH_*` environment
//! variables.
//!
//! An environment variable names a key path with `__` between levels:
//! `VITALWATCH_DATABASE__URL=postgres://…` sets `[database] url`. Its value is
//! read as a TOML value when it parses as one (`1883`, `true`, `[1, 2]`) and
//! as a string otherwise. Environment variables win over the file. Unknown
//! keys are errors (the config structs use `deny_unknown_fields`), so a typo
//! never silently falls back to a default.
//!
//! Some variables are not keys: `VITALWATCH_CONFIG` (the file's path),
//! `VITALWATCH_LOG` (the log filter) and everything under `VITALWATCH_TEST_`
//! (where the integration tests find their services).

use std::path::Path;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// Environment variables that are not configuration keys.
pub const RESERVED_ENV: [&str; 2] = ["VITALWATCH_CONFIG", "VITALWATCH_LOG"];
/// Prefix of environment variables that are not configuration keys.
pub const RESERVED_ENV_PREFIX: &str = "VITALWATCH_TEST_";
const PREFIX: &str = "VITALWATCH_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("environment variable {var} does not fit the configuration: {why}")]
    Env { var: String, why: String },
    #[error("invalid configuration: {0}")]
    Invalid(#[from] toml::de::Error),
}

/// Loads `T` from an optional TOML file overlaid with environment variables.
/// `env` is passed in (normally `std::env::vars()`), so tests use a map.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
            text.parse::<Table>().map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })?
        }
        None => Table::new(),
    };
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(PREFIX) && !RESERVED_ENV.contains(&k.as_str()) && !k.starts_with(RESERVED_ENV_PREFIX)
        })
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env { var, why: "empty key segment".into() });
        }
        set(&mut table, &path, parse_value(&raw)).map_err(|why| ConfigError::Env { var, why })?;
    }
    Ok(Value::Table(table).try_into()?)
}

fn parse_value(raw: &str) -> Value {
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

fn set(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    match path {
        [] => Err("empty key".into()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let entry = table.entry(head.clone()).or_insert_with(|| Value::Table(Table::new()));
            match entry {
                Value::Table(t) => set(t, rest, value),
                _ => Err(format!("{head} is not a section")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        mqtt: Mqtt,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Mqtt {
        host: String,
        port: u16,
    }

    impl Default for Mqtt {
        fn default() -> Self {
            Mqtt { host: "127.0.0.1".into(), port: 1883 }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_apply_without_file_or_env() {
        let c: Cfg = load(None, env(&[])).expect("defaults");
        assert_eq!(c.mqtt, Mqtt::default());
    }

    #[test]
    fn env_overrides_with_typed_values() {
        let c: Cfg = load(None, env(&[("VITALWATCH_MQTT__PORT", "18830"), ("VITALWATCH_MQTT__HOST", "10.0.0.1"), ("VITALWATCH_LOG", "debug"), ("VITALWATCH_TEST_KAFKA", "x"), ("OTHER", "x")]))
            .expect("env");
        assert_eq!(c.mqtt, Mqtt { host: "10.0.0.1".into(), port: 18830 });
    }

    #[test]
    fn file_then_env() {
        let dir = std::env::temp_dir().join(format!("vw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "[mqtt]\nhost = \"broker\"\nport = 1\n").expect("write");
        let c: Cfg = load(Some(&path), env(&[("VITALWATCH_MQTT__PORT", "2")])).expect("file");
        assert_eq!(c.mqtt, Mqtt { host: "broker".into(), port: 2 });
        std::fs::write(&path, "[mqtt]\nhots = \"typo\"\n").expect("write");
        let err = load::<Cfg>(Some(&path), env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("hots"), "{err}");
    }

    #[test]
    fn unknown_env_keys_and_bad_types_are_errors() {
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PROT", "1")])).is_err());
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PORT", "not-a-port")])).is_err());
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PORT__X", "1")])).is_err());
    }
}
