//! Where export files go.

/// Azure container naming rules (used for every backend so exports can move between them):
/// 3–63 characters of lowercase letters, digits and single hyphens, starting and ending with a
/// letter or digit.
pub fn validate_container_name(name: &str) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::validate_container_name as v;

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
