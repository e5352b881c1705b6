//! Typed configuration from a TOML file plus `VITALWATCH_*` environment
//! variables.
//!
//! An environment variable names a key path with `__` between levels:
//! `VITALWATCH_DATABASE__URL=postgres://…` sets `[database] url`. Its value is
//! read as a TOML value when it parses as one (`1883`, `true`, `[1, 2]`) and
//! as a string otherwise; where the field is a string, the raw text is used
//! (a password `123456` stays a string). Environment variables win over the
//! file. Unknown keys are errors (the config structs use
//! `deny_unknown_fields`), so a typo never silently falls back to a default.
//!
//! Only variables with a `__` are keys (every key lives in a section), so the
//! scripts' own `VITALWATCH_MQTT_PORT` and the like never collide. Also not
//! keys: `VITALWATCH_CONFIG` (the file's path), `VITALWATCH_LOG` (the log
//! filter) and everything under `VITALWATCH_TEST_` (where the integration
//! tests find their services).

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
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
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
    let table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            text.parse::<Table>().map_err(|source| ConfigError::Parse {
                path: path.display().to_string(),
                source,
            })?
        }
        None => Table::new(),
    };
    let mut vars: Vec<(String, Vec<String>, String)> = Vec::new();
    for (var, raw) in env {
        if !var.starts_with(PREFIX)
            || !var.contains("__")
            || RESERVED_ENV.contains(&var.as_str())
            || var.starts_with(RESERVED_ENV_PREFIX)
        {
            continue;
        }
        let path: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                why: "empty key segment".into(),
            });
        }
        vars.push((var, path, raw));
    }
    vars.sort();
    // Typed values first; a variable whose typed value is refused is then
    // tried as its raw text (a numeric password), one at a time.
    let mut as_text = vec![false; vars.len()];
    loop {
        let mut t = table.clone();
        for ((var, path, raw), text) in vars.iter().zip(&as_text) {
            let value = if *text {
                Value::String(raw.clone())
            } else {
                parse_value(raw)
            };
            set(&mut t, path, value).map_err(|why| ConfigError::Env {
                var: var.clone(),
                why,
            })?;
        }
        let first_error = match Value::Table(t.clone()).try_into::<T>() {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let fix = vars
            .iter()
            .zip(&as_text)
            .position(|((_, path, raw), text)| {
                if *text || matches!(parse_value(raw), Value::String(_)) {
                    return false;
                }
                let mut t2 = t.clone();
                let _ = set(&mut t2, path, Value::String(raw.clone()));
                match Value::Table(t2).try_into::<T>() {
                    Ok(_) => true,
                    Err(e) => e.to_string() != first_error.to_string(),
                }
            });
        match fix {
            Some(i) => as_text[i] = true,
            None => return Err(first_error.into()),
        }
    }
}

fn parse_value(raw: &str) -> Value {
    // Quotes belong to the value: `"abc"` stays `"abc"`, not `abc`.
    if raw.starts_with(['"', '\'']) {
        return Value::String(raw.to_owned());
    }
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
            let entry = table
                .entry(head.clone())
                .or_insert_with(|| Value::Table(Table::new()));
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
        password: Option<String>,
    }

    impl Default for Mqtt {
        fn default() -> Self {
            Mqtt {
                host: "127.0.0.1".into(),
                port: 1883,
                password: None,
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_without_file_or_env() {
        let c: Cfg = load(None, env(&[])).expect("defaults");
        assert_eq!(c.mqtt, Mqtt::default());
    }

    #[test]
    fn env_overrides_with_typed_values() {
        let c: Cfg = load(
            None,
            env(&[
                ("VITALWATCH_MQTT__PORT", "18830"),
                ("VITALWATCH_MQTT__HOST", "10.0.0.1"),
                ("VITALWATCH_LOG", "debug"),
                ("VITALWATCH_TEST_KAFKA", "x"),
                ("OTHER", "x"),
            ]),
        )
        .expect("env");
        assert_eq!(
            c.mqtt,
            Mqtt {
                host: "10.0.0.1".into(),
                port: 18830,
                password: None
            }
        );
    }

    #[test]
    fn file_then_env() {
        let dir = std::env::temp_dir().join(format!("vw-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("c.toml");
        std::fs::write(&path, "[mqtt]\nhost = \"broker\"\nport = 1\n").expect("write");
        let c: Cfg = load(Some(&path), env(&[("VITALWATCH_MQTT__PORT", "2")])).expect("file");
        assert_eq!(
            c.mqtt,
            Mqtt {
                host: "broker".into(),
                port: 2,
                password: None
            }
        );
        std::fs::write(&path, "[mqtt]\nhots = \"typo\"\n").expect("write");
        let err = load::<Cfg>(Some(&path), env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("hots"), "{err}");
    }

    #[test]
    fn text_that_looks_typed_stays_text_where_a_string_is_wanted() {
        let c: Cfg = load(
            None,
            env(&[
                ("VITALWATCH_MQTT__PASSWORD", "123456"),
                ("VITALWATCH_MQTT__PORT", "18830"),
            ]),
        )
        .expect("numeric password");
        assert_eq!(c.mqtt.password.as_deref(), Some("123456"));
        assert_eq!(c.mqtt.port, 18830);
        let c: Cfg = load(None, env(&[("VITALWATCH_MQTT__PASSWORD", "true")]))
            .expect("boolean-looking password");
        assert_eq!(c.mqtt.password.as_deref(), Some("true"));
        let c: Cfg = load(None, env(&[("VITALWATCH_MQTT__PASSWORD", "\"quoted\"")]))
            .expect("quoted password");
        assert_eq!(c.mqtt.password.as_deref(), Some("\"quoted\""));
    }

    #[test]
    fn script_variables_without_a_section_are_not_keys() {
        let c: Cfg = load(
            None,
            env(&[
                ("VITALWATCH_MQTT_PORT", "28830"),
                ("VITALWATCH_SIM_PATIENTS", "5"),
            ]),
        )
        .expect("ignored");
        assert_eq!(c.mqtt, Mqtt::default());
    }

    #[test]
    fn unknown_env_keys_and_bad_types_are_errors() {
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PROT", "1")])).is_err());
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PORT", "not-a-port")])).is_err());
        assert!(load::<Cfg>(None, env(&[("VITALWATCH_MQTT__PORT__X", "1")])).is_err());
    }
}
