//! Request paths as authorization policies see them: Istio's default normalization.
//!
//! A policy that says `paths: ["/admin/*"]` must not be walked around by writing the same
//! resource another way (`/./admin/x`, `//admin/x`, `/public/../admin/x`, `/%61dmin/x`), so
//! the path is normalized before it is matched, as Envoy does for Istio:
//!
//! 1. the query (from the first `?`) is not part of the path;
//! 2. percent-encoded unreserved characters (RFC 3986: `ALPHA DIGIT - . _ ~`) are decoded,
//!    other percent-encodings are kept with upper-case hex digits;
//! 3. `.` and `..` segments are resolved (RFC 3986 5.2.4), never above the root;
//! 4. runs of `/` are merged into one.
//!
//! Case is significant and never folded (`/ADMIN` is not `/admin`). A path that could mean
//! two things to the app is refused instead: an encoded `/` or `\` (`%2F`, `%5C`, any case;
//! apps disagree on whether `/a%2Fb` is one segment or two), a raw `\`, a malformed
//! percent-encoding, a fragment, or a request target that is not origin-form (it must
//! start with `/`). The caller refuses such a request (400) when a policy matches on paths.

use std::borrow::Cow;

/// Why a request path cannot be matched against policies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The request target does not start with `/` (`*`, absolute or empty), or carries a
    /// fragment.
    #[error("path {0:?} is not origin-form (it must start with \"/\" and carry no fragment)")]
    NotOriginForm(String),
    /// An encoded `/` or `\` (`%2F`, `%5C`), or a raw `\`: the app could read the path
    /// differently from the policy.
    #[error("path {0:?} contains an encoded \"/\" or a \"\\\" (%2F, %5C)")]
    EscapedSlash(String),
    /// A `%` not followed by two hex digits.
    #[error("path {0:?} has a malformed percent-encoding")]
    BadEscape(String),
}

/// The normalized form of `target` (a request's path, optionally followed by its query),
/// without the query. Borrowed when the path is already normal, which is the common case.
pub fn normalize_path(target: &str) -> Result<Cow<'_, str>, PathError> {
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if !path.starts_with('/') || path.contains('#') {
        return Err(PathError::NotOriginForm(target.to_owned()));
    }
    let decoded = decode_unreserved(path)?;
    let resolved = match remove_dot_segments(&decoded) {
        Some(resolved) => Cow::Owned(resolved),
        None => decoded,
    };
    Ok(match merge_slashes(&resolved) {
        Some(merged) => Cow::Owned(merged),
        None => resolved,
    })
}

/// Step 2: decodes `%XX` of unreserved characters, upper-cases the others; refuses `%2F`,
/// `%5C`, a raw `\` and a bad escape.
fn decode_unreserved(path: &str) -> Result<Cow<'_, str>, PathError> {
    let bytes = path.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'%' | b'\\')) {
        return Ok(Cow::Borrowed(path));
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find(['%', '\\']) {
        out.push_str(&rest[..at]);
        let tail = &rest.as_bytes()[at..];
        if tail[0] == b'\\' {
            return Err(PathError::EscapedSlash(path.to_owned()));
        }
        let value = match (tail.get(1).and_then(hex), tail.get(2).and_then(hex)) {
            (Some(hi), Some(lo)) => hi << 4 | lo,
            _ => return Err(PathError::BadEscape(path.to_owned())),
        };
        match value {
            b'/' | b'\\' => return Err(PathError::EscapedSlash(path.to_owned())),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(b));
            }
            b => {
                out.push('%');
                out.push(char::from(HEX_UPPER[usize::from(b >> 4)]));
                out.push(char::from(HEX_UPPER[usize::from(b & 0xf)]));
            }
        }
        // Both digits are ASCII (checked above), so index 3 is a char boundary.
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Step 3 on a path starting with `/`: `None` when there is no `.` or `..` segment.
/// Empty segments count as segments here (as in RFC 3986 and Envoy); step 4 merges them.
fn remove_dot_segments(path: &str) -> Option<String> {
    let segments = || path[1..].split('/');
    if !segments().any(|s| s == "." || s == "..") {
        return None;
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut segments = segments().peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                // Never above the root: `/..` is `/`.
                kept.pop();
            }
            s => kept.push(s),
        }
        // `/a/b/..` and `/a/.` name a directory: they keep their trailing `/`.
        if last && matches!(segment, "." | "..") {
            kept.push("");
        }
    }
    Some(format!("/{}", kept.join("/")))
}

/// Step 4: `None` when no `//` occurs.
fn merge_slashes(path: &str) -> Option<String> {
    if !path.contains("//") {
        return None;
    }
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_normalize_to_the_protected_path() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/./admin", "/admin"),
            ("//admin", "/admin"),
            ("///admin//x", "/admin/x"),
            ("/public/../admin", "/admin"),
            ("/public/x/../../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/%2E/admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/.%2e/admin", "/admin"),
            ("/a//../admin", "/a/admin"),
            ("/../../admin", "/admin"),
            ("/admin?x", "/admin"),
            ("/admin?x=/../y", "/admin"),
            ("/..", "/"),
            ("/.", "/"),
            ("/", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("/.../x", "/.../x"),
            ("/..a/x", "/..a/x"),
            ("/%7euser", "/~user"),
            ("/%41%5a%30_-", "/AZ0_-"),
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw:?}");
        }
    }

    #[test]
    fn case_is_significant_and_reserved_escapes_stay_encoded() {
        assert_eq!(normalize_path("/ADMIN").as_deref(), Ok("/ADMIN"));
        assert_eq!(normalize_path("/Admin/X").as_deref(), Ok("/Admin/X"));
        // Not unreserved: kept encoded, hex digits upper-cased (one spelling per path).
        assert_eq!(normalize_path("/a%3ab").as_deref(), Ok("/a%3Ab"));
        assert_eq!(normalize_path("/a%20b").as_deref(), Ok("/a%20b"));
        assert_eq!(normalize_path("/a%25b").as_deref(), Ok("/a%25b"));
        // `%252e` is `%2e` encoded once more: one decoding only, so it stays a name.
        assert_eq!(
            normalize_path("/%252e%252e/x").as_deref(),
            Ok("/%252e%252e/x")
        );
    }

    #[test]
    fn already_normal_paths_are_borrowed() {
        for p in ["/", "/admin", "/a/b/c.js", "/a?b=..//"] {
            assert!(
                matches!(normalize_path(p), Ok(Cow::Borrowed(_))),
                "{p:?} allocated"
            );
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for raw in [
            "/admin%2Fx",
            "/admin%2fx",
            "/a%5Cb",
            "/a%5cb",
            "/a\\b",
            "/%2F",
        ] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::EscapedSlash(_))),
                "{raw:?}"
            );
        }
        for raw in ["/a%", "/a%2", "/a%zz", "/a%%41", "/a%g1"] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::BadEscape(_))),
                "{raw:?}"
            );
        }
        for raw in ["", "*", "admin", "http://x/admin", "/a#b", "?x"] {
            assert!(
                matches!(normalize_path(raw), Err(PathError::NotOriginForm(_))),
                "{raw:?}"
            );
        }
        // The query is not the path: an encoded slash there is the app's business.
        assert_eq!(normalize_path("/a?next=%2Fb").as_deref(), Ok("/a"));
        assert_eq!(
            normalize_path("/admin%2Fx").unwrap_err().to_string(),
            "path \"/admin%2Fx\" contains an encoded \"/\" or a \"\\\" (%2F, %5C)"
        );
    }
}
