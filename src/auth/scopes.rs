//! SMART system scopes, v1 (`system/Observation.read`, `system/*.write`, `system/*.*`) and v2
//! (`system/Observation.rs`, `system/*.cruds`) spellings.

use std::fmt;

use crate::fhir::is_resource_type;

/// What a scope permits, as SMART v2 letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    pub create: bool,
    pub read: bool,
    pub update: bool,
    pub delete: bool,
    pub search: bool,
    /// The operators' pages (`/admin`): only by `system/fhir-export.admin`.
    pub admin: bool,
}

/// The scope of the operators' pages.
pub const ADMIN_SCOPE: &str = "system/fhir-export.admin";

impl Permissions {
    fn covers(&self, other: &Permissions) -> bool {
        (self.admin || !other.admin)
            && (self.create || !other.create)
            && (self.read || !other.read)
            && (self.update || !other.update)
            && (self.delete || !other.delete)
            && (self.search || !other.search)
    }
}

/// One `system/{Type|*}.{permissions}` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// None: every type (`*`).
    pub resource_type: Option<String>,
    pub permissions: Permissions,
    /// As written, for the granted `scope` string.
    text: String,
}

impl Scope {
    /// Parses a system scope; None for anything else (`openid`, `patient/…`, typos).
    pub fn parse(text: &str) -> Option<Scope> {
        if text == ADMIN_SCOPE {
            // Only the admin pages: no resource may be read or written with it.
            return Some(Scope {
                resource_type: None,
                permissions: Permissions {
                    admin: true,
                    ..Default::default()
                },
                text: text.to_string(),
            });
        }
        let rest = text.strip_prefix("system/")?;
        let (target, perms) = rest.split_once('.')?;
        let resource_type = match target {
            "*" => None,
            t if is_resource_type(t) => Some(t.to_string()),
            _ => return None,
        };
        let all = Permissions {
            create: true,
            read: true,
            update: true,
            delete: true,
            search: true,
            admin: false,
        };
        let permissions = match perms {
            "read" => Permissions {
                read: true,
                search: true,
                ..Default::default()
            },
            "write" => Permissions {
                create: true,
                update: true,
                delete: true,
                ..Default::default()
            },
            "*" => all,
            letters => v2_permissions(letters)?,
        };
        Some(Scope {
            resource_type,
            permissions,
            text: text.to_string(),
        })
    }

    fn applies_to(&self, resource_type: &str) -> bool {
        self.resource_type
            .as_deref()
            .is_none_or(|t| t == resource_type)
    }

    /// Does this scope permit everything `other` does?
    fn covers(&self, other: &Scope) -> bool {
        let type_ok = match (&self.resource_type, &other.resource_type) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        type_ok && self.permissions.covers(&other.permissions)
    }
}

/// SMART v2 letters, each at most once and in `cruds` order.
fn v2_permissions(letters: &str) -> Option<Permissions> {
    let mut p = Permissions::default();
    let mut last = None;
    for c in letters.chars() {
        let rank = "cruds".find(c)?;
        if last.is_some_and(|l| l >= rank) {
            return None;
        }
        last = Some(rank);
        match c {
            'c' => p.create = true,
            'r' => p.read = true,
            'u' => p.update = true,
            'd' => p.delete = true,
            _ => p.search = true,
        }
    }
    last.map(|_| p)
}

/// What a caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scopes(Vec<Scope>);

/// An operation on a resource type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    /// Search-style reads: export reads whole types.
    Export,
    Create,
    Update,
    Delete,
}

impl Scopes {
    /// Every permission on every type (auth mode `none`).
    pub fn all() -> Scopes {
        Scopes(vec![Scope::parse("system/*.cruds").expect("valid scope")])
    }

    /// The system scopes in a space-separated list; others are dropped.
    pub fn parse_list(list: &str) -> Scopes {
        Scopes(list.split_whitespace().filter_map(Scope::parse).collect())
    }

    pub fn from_scopes(scopes: Vec<Scope>) -> Scopes {
        Scopes(scopes)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows(&self, access: Access, resource_type: &str) -> bool {
        self.0.iter().any(|s| {
            let p = &s.permissions;
            s.applies_to(resource_type)
                && match access {
                    Access::Read => p.read,
                    Access::Export => p.read && p.search,
                    Access::Create => p.create,
                    Access::Update => p.update,
                    Access::Delete => p.delete,
                }
        })
    }

    /// May the caller see and cancel every job on the admin pages?
    pub fn admin(&self) -> bool {
        self.0.iter().any(|s| s.permissions.admin)
    }

    /// Is every type exportable (a `*` scope with read and search)?
    pub fn exports_every_type(&self) -> bool {
        self.0
            .iter()
            .any(|s| s.resource_type.is_none() && s.permissions.read && s.permissions.search)
    }

    /// The requested scopes these scopes cover (what a token may be granted).
    pub fn grant(&self, requested: &[Scope]) -> Scopes {
        Scopes(
            requested
                .iter()
                .filter(|r| self.0.iter().any(|mine| mine.covers(r)))
                .cloned()
                .collect(),
        )
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<&str> = self.0.iter().map(|s| s.text.as_str()).collect();
        f.write_str(&texts.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(list: &str) -> Scopes {
        Scopes::parse_list(list)
    }

    #[test]
    fn v1_and_v2_spellings() {
        let v1 = scopes("system/*.read");
        let v2 = scopes("system/*.rs");
        for s in [&v1, &v2] {
            assert!(s.allows(Access::Export, "Observation"));
            assert!(s.allows(Access::Read, "Patient"));
            assert!(!s.allows(Access::Create, "Patient"));
            assert!(s.exports_every_type());
        }
        let typed = scopes("system/Observation.rs system/Patient.read");
        assert!(typed.allows(Access::Export, "Observation"));
        assert!(typed.allows(Access::Export, "Patient"));
        assert!(!typed.allows(Access::Export, "Condition"));
        assert!(!typed.exports_every_type());
        let write = scopes("system/*.write");
        assert!(write.allows(Access::Create, "Patient") && write.allows(Access::Delete, "Patient"));
        assert!(!write.allows(Access::Read, "Patient"));
        let cud = scopes("system/Patient.cud");
        assert!(cud.allows(Access::Update, "Patient") && !cud.allows(Access::Update, "Group"));
        assert!(scopes("system/*.*").allows(Access::Delete, "Group"));
        // Read without search is not enough for an export.
        assert!(!scopes("system/*.r").allows(Access::Export, "Patient"));
    }

    #[test]
    fn malformed_and_foreign_scopes_are_dropped() {
        for bad in [
            "patient/*.read",
            "openid",
            "system/Nope.read",
            "system/*.sr",
            "system/*.rr",
            "system/*.x",
            "system/*.",
            "system/*",
        ] {
            assert!(Scope::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn grants_are_what_the_allowed_scopes_cover() {
        let allowed = scopes("system/*.read system/Patient.write");
        let requested: Vec<Scope> = [
            "system/Observation.rs",
            "system/*.read",
            "system/Patient.c",
            "system/Group.c",
        ]
        .into_iter()
        .filter_map(Scope::parse)
        .collect();
        assert_eq!(
            allowed.grant(&requested).to_string(),
            "system/Observation.rs system/*.read system/Patient.c"
        );
        let narrow = scopes("system/Observation.read");
        assert!(
            narrow
                .grant(&[Scope::parse("system/*.read").unwrap()])
                .is_empty()
        );
    }

    #[test]
    fn the_admin_scope_is_granted_only_to_whom_it_is_allowed_and_reads_nothing() {
        let admin = scopes(ADMIN_SCOPE);
        assert!(admin.admin());
        assert!(!admin.allows(Access::Read, "Patient"));
        assert!(!admin.exports_every_type());
        let requested = [Scope::parse(ADMIN_SCOPE).unwrap()];
        assert!(scopes("system/*.cruds").grant(&requested).is_empty());
        assert!(!Scopes::all().admin());
        let both = scopes(&format!("system/*.read {ADMIN_SCOPE}"));
        assert_eq!(both.grant(&requested).to_string(), ADMIN_SCOPE);
    }
}
