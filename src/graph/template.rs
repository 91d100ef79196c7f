//! Prompt templates with `{key}` placeholders filled from the state, as Lár's
//! `prompt_template.format(**state)`: `{{` and `}}` are literal braces. A placeholder with no
//! value in the state is an error that names it; a prompt is never sent half filled.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Placeholders whose keys are not in the state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {} no value in the state", placeholder_list(.0), if .0.len() == 1 { "has" } else { "have" })]
pub struct MissingKeys(pub Vec<String>);

fn placeholder_list(keys: &[String]) -> String {
    let shown: Vec<String> = keys.iter().map(|k| format!("{{{k}}}")).collect();
    format!(
        "placeholder{} {}",
        if keys.len() == 1 { "" } else { "s" },
        shown.join(", ")
    )
}

impl Template {
    /// Parses a template; unbalanced braces and empty placeholders are errors.
    pub fn parse(source: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((pos, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut key = String::new();
                    let mut closed = false;
                    for (_, k) in chars.by_ref() {
                        match k {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => {
                                return Err(format!(
                                    "'{{' inside the placeholder that starts at character {pos}"
                                ))
                            }
                            other => key.push(other),
                        }
                    }
                    if !closed {
                        return Err(format!(
                            "the placeholder that starts at character {pos} is not closed (write '{{{{' for a literal brace)"
                        ));
                    }
                    let key = key.trim().to_string();
                    if key.is_empty() {
                        return Err(format!(
                            "empty placeholder '{{}}' at character {pos}: name a state key"
                        ));
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Key(key));
                }
                '}' => {
                    return Err(format!(
                        "unmatched '}}' at character {pos} (write '}}}}' for a literal brace)"
                    ))
                }
                other => text.push(other),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The state keys the template reads, in order of first use.
    pub fn keys(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.parts {
            if let Part::Key(k) = p {
                if !out.contains(&k.as_str()) {
                    out.push(k);
                }
            }
        }
        out
    }

    /// Fills the placeholders: strings as they are, other values as compact JSON.
    pub fn render(&self, state: &Map<String, Value>) -> Result<String, MissingKeys> {
        let missing: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| !state.contains_key(*k))
            .map(str::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(MissingKeys(missing));
        }
        let mut out = String::with_capacity(self.source.len() + 64);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Key(k) => match state.get(k) {
                    Some(Value::String(s)) => out.push_str(s),
                    Some(other) => out.push_str(&other.to_string()),
                    None => {}
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn renders_and_escapes() {
        let t = Template::parse("Ticket {id}: {text} {{literal}} {meta}").unwrap();
        assert_eq!(t.keys(), vec!["id", "text", "meta"]);
        let s = state(json!({"id": 7, "text": "hello", "meta": {"a": [1, 2]}}));
        assert_eq!(
            t.render(&s).unwrap(),
            "Ticket 7: hello {literal} {\"a\":[1,2]}"
        );
    }

    #[test]
    fn missing_keys_are_named() {
        let t = Template::parse("{a} {b} {c} {a}").unwrap();
        let e = t.render(&state(json!({"b": 1}))).unwrap_err();
        assert_eq!(e.0, vec!["a", "c"]);
        assert_eq!(
            e.to_string(),
            "placeholders {a}, {c} have no value in the state"
        );
    }

    #[test]
    fn bad_templates() {
        assert!(Template::parse("open {brace").is_err());
        assert!(Template::parse("close } brace").is_err());
        assert!(Template::parse("empty {}").is_err());
        assert!(Template::parse("nested {a{b}}").is_err());
        assert!(Template::parse("fine {{}}").is_ok());
    }
}
