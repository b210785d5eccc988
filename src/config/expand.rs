//! `${VAR}` interpolation, applied to every string value of the parsed TOML before
//! it is mapped onto the config types, so an error can name the key that used it.

use toml::Value;

/// Why a string could not be expanded.
#[derive(Debug, PartialEq, Eq)]
pub enum ExpandError {
    Missing(String),
    Unterminated,
}

/// Expands `${VAR}` in every string of `value`, depth first. `lookup` is the
/// environment (a parameter so tests need not touch the process environment).
/// Returns the values substituted (they may be secrets, so errors redact them),
/// or on failure the dotted key path and the reason.
pub fn expand_all(
    value: &mut Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, (String, ExpandError)> {
    let mut substituted = Vec::new();
    let mut recording = |name: &str| {
        let value = lookup(name)?;
        substituted.push(value.clone());
        Some(value)
    };
    walk(value, &mut String::new(), &mut recording)?;
    Ok(substituted)
}

fn walk(
    value: &mut Value,
    path: &mut String,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<(), (String, ExpandError)> {
    match value {
        Value::String(s) if s.contains("${") => {
            *s = expand(s, lookup).map_err(|e| (path.clone(), e))?;
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands one string. A `$` not followed by `{` is kept as is.
pub fn expand(
    input: &str,
    lookup: &mut dyn FnMut(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let name = &after[..end];
        let value = lookup(name).ok_or_else(|| ExpandError::Missing(name.to_owned()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "KEY").then(|| "v".to_owned())
    }

    #[test]
    fn expands_and_keeps_plain_dollars() {
        assert_eq!(expand("a${KEY}b$c", &mut env).as_deref(), Ok("avb$c"));
    }

    #[test]
    fn missing_var_is_named() {
        assert_eq!(
            expand("${NOPE}", &mut env),
            Err(ExpandError::Missing("NOPE".into()))
        );
    }

    #[test]
    fn unterminated_is_an_error() {
        assert_eq!(expand("${KEY", &mut env), Err(ExpandError::Unterminated));
    }

    #[test]
    fn error_names_the_key_path() {
        let mut value: Value =
            toml::from_str("[integrations.box]\nclient_id = \"${NOPE}\"").unwrap();
        let (path, _) = expand_all(&mut value, &env).unwrap_err();
        assert_eq!(path, "integrations.box.client_id");
    }
}
