//! The plugin configuration as the filter takes it: the engine's JSON schema, plus what only the
//! Envoy filter needs (every provider's `cluster`) and keys named by environment variables
//! (`api_key_env`), read once at configure time so no key has to be written into Envoy's
//! configuration (which its admin `/config_dump` shows). Refusals are one line naming the field,
//! the provider and the variable, never a value.

use unbusy_core::config::Config;
use unbusy_core::json::quoted;

/// Reads the key of every provider configured with `api_key_env` from the environment (`env`
/// looks a variable up) into its `api_key`. A variable that is missing or empty (after trimming
/// whitespace, which a key never holds) refuses the configuration: the message names each such
/// provider and variable, and never holds a value.
pub fn resolve_keys(
    config: &mut Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let mut missing = Vec::new();
    for (i, p) in config.providers.iter_mut().enumerate() {
        let Some(name) = p.api_key_env.take() else {
            continue;
        };
        match env(&name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
        {
            Some(key) => p.api_key = Some(key),
            // Names quoted as JSON, not with `{:?}` (whose `Debug` links Unicode tables).
            None => missing.push(format!(
                "providers[{i}] ({}): api_key_env names {}, which is not set or empty \
                 in the VM's environment",
                quoted(&p.name),
                quoted(&name)
            )),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (Envoy passes a variable of its own environment to the VM when \
             vm_config.environment_variables.host_env_keys lists it)",
            missing.join("; ")
        ))
    }
}

/// Why a configuration was refused, in one line naming the field.
pub fn check_config(config: &Config) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    for (i, p) in config.providers.iter().enumerate() {
        if p.cluster.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "providers[{i}].cluster is required by the Envoy filter (the cluster that reaches {})",
                quoted(&p.name)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_config, resolve_keys};
    use unbusy_core::config::Config;

    #[test]
    fn keys_named_by_variables_are_read_and_a_missing_one_refuses_the_configuration() {
        let json = br#"{"providers":[
            {"name":"a","cluster":"ca","api_key_env":"KEY_A"},
            {"name":"b","cluster":"cb","api_key":"inline"},
            {"name":"c","cluster":"cc","api_key_env":"KEY_C"}]}"#;
        let mut config = Config::from_json(json).unwrap();
        let env = |name: &str| match name {
            "KEY_A" => Some("sk-a\n".to_string()),
            "KEY_C" => Some("sk-c".to_string()),
            _ => None,
        };
        resolve_keys(&mut config, env).unwrap();
        let keys: Vec<_> = config.providers.iter().map(|p| p.api_key.clone()).collect();
        assert_eq!(
            keys,
            [
                Some("sk-a".into()),
                Some("inline".into()),
                Some("sk-c".into())
            ]
        );
        assert!(config.providers.iter().all(|p| p.api_key_env.is_none()));
        // Resolved, it is still a valid configuration for the filter.
        check_config(&config).unwrap();

        let mut config = Config::from_json(json).unwrap();
        let only_a = |name: &str| (name == "KEY_A").then(|| "secret-a".to_string());
        let e = resolve_keys(&mut config, only_a).unwrap_err();
        assert!(
            e.starts_with("providers[2] (\"c\"): api_key_env names \"KEY_C\""),
            "{e}"
        );
        assert!(!e.contains("secret-a"), "{e}");
        let mut config = Config::from_json(json).unwrap();
        let blank = |_: &str| Some("  ".to_string());
        let e = resolve_keys(&mut config, blank).unwrap_err();
        assert!(
            e.contains("providers[0]") && e.contains("providers[2]"),
            "{e}"
        );
    }

    #[test]
    fn names_in_refusals_are_quoted_and_escaped() {
        // A name cannot break the log line: quotes and control characters are escaped.
        let json =
            br#"{"providers":[{"name":"a\"b\nc","base_url":"http://x","api_key_env":"K\"1"}]}"#;
        let config = Config::from_json(json).unwrap();
        let e = check_config(&config).unwrap_err();
        assert!(
            e.ends_with(r#"(the cluster that reaches "a\"b\nc")"#),
            "{e}"
        );
        let mut config = Config::from_json(json).unwrap();
        let e = resolve_keys(&mut config, |_| None).unwrap_err();
        assert!(
            e.starts_with(r#"providers[0] ("a\"b\nc"): api_key_env names "K\"1","#),
            "{e}"
        );
    }
}
