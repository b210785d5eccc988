//! `${VAR}` and `${file:PATH}` interpolation, applied to every string value of
//! the parsed TOML before it is mapped onto the config types, so an error can
//! name the key that used it. Files are how Kubernetes and Docker hand secrets
//! to a container.

use toml::Value;

/// Why a string could not be expanded.
#[derive(Debug, PartialEq, Eq)]
pub enum ExpandError {
    Missing(String),
    Unterminated,
    /// `${file:PATH}` could not be read: the path and the reason.
    File(String, String),
}

/// One `${…}` replaced: where, what it named, and its value.
pub struct Substitution {
    /// The dotted key path, as in errors.
    pub key: String,
    /// What was inside `${…}`: a variable name, or `file:PATH`.
    pub reference: String,
    pub value: String,
}

/// Expands `${VAR}` and `${file:PATH}` in every string of `value`, depth first.
/// `lookup` is the environment (a parameter so tests need not touch the
/// process environment).
/// Returns the substitutions made (the values may be secrets, so errors redact
/// them), or on failure the dotted key path and the reason.
pub fn expand_all(
    value: &mut Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Substitution>, (String, ExpandError)> {
    let mut substituted = Vec::new();
    let mut recording = |key: &str, name: &str| {
        let value = match name.strip_prefix("file:") {
            Some(path) => read_file(path)?,
            None => lookup(name).ok_or_else(|| ExpandError::Missing(name.to_owned()))?,
        };
        substituted.push(Substitution {
            key: key.to_owned(),
            reference: name.to_owned(),
            value: value.clone(),
        });
        Ok(value)
    };
    walk(value, &mut String::new(), &mut recording)?;
    Ok(substituted)
}

/// `lookup` gets the key path and the reference.
fn walk(
    value: &mut Value,
    path: &mut String,
    lookup: &mut dyn FnMut(&str, &str) -> Result<String, ExpandError>,
) -> Result<(), (String, ExpandError)> {
    match value {
        Value::String(s) if s.contains("${") => {
            let key = path.as_str();
            *s = expand(s, &mut |name| lookup(key, name)).map_err(|e| (path.clone(), e))?;
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

/// A secret file's contents, with one trailing newline trimmed (`echo` and
/// most editors add one; `kubectl create secret --from-file` keeps it).
fn read_file(path: &str) -> Result<String, ExpandError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ExpandError::File(path.to_owned(), e.to_string()))?;
    let trimmed = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    Ok(trimmed.to_owned())
}

/// Expands one string. A `$` not followed by `{` is kept as is.
fn expand(
    input: &str,
    lookup: &mut dyn FnMut(&str) -> Result<String, ExpandError>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let name = &after[..end];
        out.push_str(&lookup(name)?);
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

    fn expand_one(text: &str) -> Result<String, ExpandError> {
        let mut value = Value::String(text.to_owned());
        expand_all(&mut value, &env).map_err(|(_, e)| e)?;
        Ok(value.as_str().unwrap().to_owned())
    }

    #[test]
    fn expands_and_keeps_plain_dollars() {
        assert_eq!(expand_one("a${KEY}b$c").as_deref(), Ok("avb$c"));
    }

    #[test]
    fn missing_var_is_named() {
        assert_eq!(
            expand_one("${NOPE}"),
            Err(ExpandError::Missing("NOPE".into()))
        );
    }

    #[test]
    fn unterminated_is_an_error() {
        assert_eq!(expand_one("${KEY"), Err(ExpandError::Unterminated));
    }

    #[test]
    fn file_contents_lose_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("plain", "s3cret", "s3cret"),
            ("newline", "s3cret\n", "s3cret"),
            ("crlf", "s3cret\r\n", "s3cret"),
            ("two", "s3cret\n\n", "s3cret\n"),
            ("inner", "a\nb\n", "a\nb"),
        ];
        for (name, contents, want) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            let text = format!("x-${{file:{}}}-y", path.display());
            assert_eq!(expand_one(&text), Ok(format!("x-{want}-y")), "{name}");
        }
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        for path in [missing, dir.path().to_owned()] {
            let path = path.display().to_string();
            let result = expand_one(&format!("${{file:{path}}}"));
            assert!(
                matches!(&result, Err(ExpandError::File(named, _)) if *named == path),
                "{result:?}"
            );
        }
    }

    #[test]
    fn error_names_the_key_path() {
        let mut value: Value =
            toml::from_str("[integrations.box]\nclient_id = \"${NOPE}\"").unwrap();
        let (path, _) = expand_all(&mut value, &env).err().unwrap();
        assert_eq!(path, "integrations.box.client_id");
    }
}
