//! Header value and query parameter templates, compiled at load time.
//!
//! A template is literal text with `{{ $.integrations.NAME.access_token }}` or
//! `{{ $.integrations.NAME.token_type }}` expressions — the syntax workflow steps
//! already use. Compiling once means a request only clones a rendered value.

use http::HeaderValue;

use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    AccessToken,
    TokenType,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The one integration the expressions refer to, if any.
    integration: Option<String>,
    parts: Vec<Part>,
}

impl Template {
    /// The template `Bearer {{ $.integrations.NAME.access_token }}`.
    pub fn bearer(integration: &str) -> Self {
        Self {
            integration: Some(integration.to_owned()),
            parts: vec![Part::Literal("Bearer ".into()), Part::AccessToken],
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut integration: Option<String> = None;
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or("unclosed \"{{\"")?;
            let (name, part) = parse_expression(after[..end].trim())?;
            match &integration {
                Some(existing) if existing != name => {
                    return Err(format!(
                        "refers to two integrations ({existing:?} and {name:?})"
                    ));
                }
                _ => integration = Some(name.to_owned()),
            }
            parts.push(part);
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let template = Self { integration, parts };
        // A literal that is not a valid header value would fail at every render.
        template
            .render(&Secret::new("token"), "bearer")
            .map_err(|_| "is not a valid header value".to_owned())?;
        Ok(template)
    }

    pub fn integration(&self) -> Option<&str> {
        self.integration.as_deref()
    }

    /// Renders a header value; marked sensitive when it carries the token, so
    /// hyper's HPACK encoder never indexes it.
    pub fn render(
        &self,
        access_token: &Secret,
        token_type: &str,
    ) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
        let mut value = HeaderValue::from_str(self.render_text(access_token, token_type).expose())?;
        value.set_sensitive(self.parts.contains(&Part::AccessToken));
        Ok(value)
    }

    /// Renders the text, say for a query parameter.
    pub fn render_text(&self, access_token: &Secret, token_type: &str) -> Secret {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::AccessToken => out.push_str(access_token.expose()),
                Part::TokenType => out.push_str(token_type),
            }
        }
        Secret::new(out)
    }
}

fn parse_expression(expr: &str) -> Result<(&str, Part), String> {
    let unknown = || {
        format!(
            "unknown expression {{{{ {expr} }}}} (expected $.integrations.NAME.access_token or .token_type)"
        )
    };
    let path = expr.strip_prefix("$.integrations.").ok_or_else(unknown)?;
    let (name, field) = path.rsplit_once('.').ok_or_else(unknown)?;
    let part = match field {
        "access_token" => Part::AccessToken,
        "token_type" => Part::TokenType,
        _ => return Err(unknown()),
    };
    Ok((name, part))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renders_token_and_type() {
        let t = Template::parse(
            "{{ $.integrations.box.token_type }} {{$.integrations.box.access_token}}",
        )
        .unwrap();
        assert_eq!(t.integration(), Some("box"));
        let value = t.render(&Secret::new("abc"), "Bearer").unwrap();
        assert_eq!(value, "Bearer abc");
        assert!(value.is_sensitive());
    }

    #[test]
    fn literal_only_is_not_sensitive() {
        let t = Template::parse("2").unwrap();
        assert_eq!(t.integration(), None);
        assert!(
            !t.render(&Secret::new("x"), "bearer")
                .unwrap()
                .is_sensitive()
        );
    }

    #[test]
    fn bearer_shorthand() {
        let value = Template::bearer("box")
            .render(&Secret::new("abc"), "bearer")
            .unwrap();
        assert_eq!(value, "Bearer abc");
    }

    #[test]
    fn rejects_bad_templates() {
        for text in [
            "{{ $.integrations.box.refresh_token }}",
            "{{ $.env.HOME }}",
            "Bearer {{ $.integrations.box.access_token",
            "{{ $.integrations.a.access_token }}{{ $.integrations.b.access_token }}",
            "bad\nvalue",
        ] {
            assert!(Template::parse(text).is_err(), "{text}");
        }
    }
}
