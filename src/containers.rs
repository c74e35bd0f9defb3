//! Container names: the rules every export container follows (Azure's, for every backend, so
//! exports can move between them), the container de-identification configurations are read
//! from, and the allow-list of `_container` values.

/// Where de-identification configurations live (`_anonymizationConfig`): a container of the
/// export storage, as in Azure's FHIR service.
pub const ANONYMIZATION: &str = "anonymization";

/// Azure container naming rules (used for every backend so exports can move between them):
/// 3–63 characters of lowercase letters, digits and single hyphens, starting and ending with a
/// letter or digit.
pub fn validate(name: &str) -> Result<(), String> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !(3..=63).contains(&name.len())
        || !valid_chars
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
    {
        return Err(format!(
            "'{name}' is not a valid container name: 3-63 characters of lowercase letters, digits \
             and single hyphens, starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// May an export go to `container`? Yes when it matches one of the `allowed` glob patterns
/// (`*` any run of characters, `?` one character), or when there are none.
pub fn allowed(allowed: &[String], container: &str) -> bool {
    allowed.is_empty()
        || allowed
            .iter()
            .any(|p| glob_matches(p.as_bytes(), container.as_bytes()))
}

/// Glob matching with `*` and `?`, linear in practice (backtracks only to the last `*`).
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::validate as v;

    #[test]
    fn containers_match_the_allowed_patterns() {
        let allowed = vec!["exports-*".to_string(), "team-?".to_string()];
        assert!(super::allowed(&allowed, "exports-2024"));
        assert!(super::allowed(&allowed, "exports-"));
        assert!(super::allowed(&allowed, "team-a"));
        assert!(!super::allowed(&allowed, "team-ab"));
        assert!(!super::allowed(&allowed, "public"));
        assert!(super::allowed(&[], "public"));
        assert!(super::glob_matches(b"*a*b*", b"xxaxxbxx"));
        assert!(!super::glob_matches(b"*a*b", b"xxaxxbxx"));
    }

    #[test]
    fn container_names_follow_azure_rules() {
        assert!(v("exports").is_ok());
        assert!(v("a-1-b").is_ok());
        assert!(v("ab").is_err());
        assert!(v(&"a".repeat(64)).is_err());
        assert!(v("Exports").is_err());
        assert!(v("-ab").is_err());
        assert!(v("ab-").is_err());
        assert!(v("a--b").is_err());
        assert!(v("a_b").is_err());
    }
}
