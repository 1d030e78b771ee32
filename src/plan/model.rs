//! Model names as inference servers read them, for finding a plan's limits
//! per model.
//!
//! A backend may serve one model under several names: Ollama reads a model
//! name without regard to ASCII case, fills in the tag `latest`, the
//! namespace `library` and the registry `registry.ollama.ai` when they are
//! left out, and drops a scheme in front (`https://`, or any other: it cuts
//! the name at its first `://`). So `Big-Model`, `big-model:latest`,
//! `library/big-model` and `ftp://registry.ollama.ai/library/big-model:latest`
//! are all `big-model`, and
//! `registry.ollama.ai/someone/big-model` is `someone/big-model`. A
//! plan's model limits are found by the same reading, so that no spelling
//! escapes them; an entry then holds a few spellings another backend (vLLM,
//! which compares names exactly) would serve as other models, which only
//! makes limits apply more often. Other tags (`big-model:70b`) and other
//! namespaces (`someone/big-model`) are other models.

/// The part of a model name that tells it apart: `name` without what comes
/// up to its first `://` (a scheme, `https://` or any other), then without
/// Ollama's default registry in front of a namespace (`registry.ollama.ai/`,
/// as in `registry.ollama.ai/someone/m`), then without its default namespace
/// (`library/`), then without the default tag (`:latest`), each matched in
/// any ASCII case.
/// Two names are the same model when their cores are equal in any ASCII
/// case ([`same_model`]). A name that would lose everything is its own core.
/// Borrowed from `name`: nothing is allocated.
pub(crate) fn core(name: &str) -> &str {
    // Ollama cuts the name at its first `://` and drops what is before,
    // whatever scheme it is (`ftp://registry.ollama.ai/library/m` is `m`).
    let mut s = name.split_once("://").map_or(name, |(_, rest)| rest);
    // The registry in front of a namespace (`registry.ollama.ai/x/m`); in
    // front of a bare name (`registry.ollama.ai/m`) it is the namespace.
    s = strip_prefix(s, "registry.ollama.ai/")
        .filter(|rest| rest.contains('/'))
        .unwrap_or(s);
    s = strip_prefix(s, "library/").unwrap_or(s);
    if let Some(bare) = s
        .len()
        .checked_sub(":latest".len())
        .filter(|&at| s.is_char_boundary(at) && s[at..].eq_ignore_ascii_case(":latest"))
    {
        s = &s[..bare];
    }
    if s.is_empty() { name } else { s }
}

/// Whether `a` and `b` name the same model ([`core`]).
pub(crate) fn same_model(a: &str, b: &str) -> bool {
    core(a).eq_ignore_ascii_case(core(b))
}

/// `s` without `prefix`, matched in any ASCII case.
fn strip_prefix<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_a_backend_serves_as_one_model_are_one() {
        for spelling in [
            "big-model",
            "Big-Model",
            "BIG-MODEL",
            "big-model:latest",
            "big-model:LATEST",
            "library/big-model",
            "Library/Big-Model:Latest",
            "registry.ollama.ai/library/big-model",
            "REGISTRY.OLLAMA.AI/library/big-model:latest",
            "https://registry.ollama.ai/library/big-model",
            "http://library/big-model:latest",
        ] {
            assert!(same_model(spelling, "big-model"), "{spelling}");
            assert!(same_model("BIG-MODEL:latest", spelling), "{spelling}");
            assert!(
                core(spelling).eq_ignore_ascii_case("big-model"),
                "{spelling}"
            );
        }
    }

    #[test]
    fn other_tags_namespaces_and_names_are_other_models() {
        for other in [
            "big-model:7b",
            "big-model:latest-q4",
            "someone/big-model",
            "registry.ollama.ai/big-model",
            "example.com/library/big-model",
            "library/library/big-model",
            "big-model2",
            "big-model ",
            "big-modeł",
        ] {
            assert!(!same_model(other, "big-model"), "{other}");
        }
        assert!(same_model("Small:7B", "small:7b"));
        assert!(!same_model("small:7b", "small"));
        assert!(same_model("org/Model-8B", "ORG/model-8b"));
    }

    /// Ollama fills in its registry in front of any namespace, not only
    /// `library/`: `someone/big-model` is
    /// `registry.ollama.ai/someone/big-model`.
    #[test]
    fn the_default_registry_before_a_namespace_is_left_out() {
        for spelling in [
            "registry.ollama.ai/someone/big-model",
            "https://REGISTRY.ollama.ai/Someone/Big-Model:latest",
        ] {
            assert!(same_model(spelling, "someone/big-model"), "{spelling}");
            assert!(!same_model(spelling, "big-model"), "{spelling}");
        }
        assert_eq!(core("registry.ollama.ai/someone/m:latest"), "someone/m");
        // Before a bare name, the registry's name is a namespace.
        assert!(!same_model("registry.ollama.ai/m", "m"));
    }

    /// Ollama drops whatever scheme is written before a registry
    /// (`strings.Cut(name, "://")`), not only `http` and `https`:
    /// `ftp://registry.ollama.ai/library/big-model` is served as
    /// `big-model`.
    #[test]
    fn any_scheme_in_front_is_left_out() {
        for spelling in [
            "ftp://registry.ollama.ai/library/big-model",
            "s3://REGISTRY.ollama.ai/library/Big-Model:latest",
            "x+y.z://registry.ollama.ai/library/big-model",
            "://registry.ollama.ai/library/big-model",
            "a/b://registry.ollama.ai/library/big-model",
            "ftp://big-model",
        ] {
            assert!(same_model(spelling, "big-model"), "{spelling}");
        }
        assert!(same_model(
            "ws://registry.ollama.ai/someone/big-model",
            "someone/big-model"
        ));
        // Another registry is another model, whatever the scheme.
        assert!(!same_model(
            "ftp://example.com/library/big-model",
            "big-model"
        ));
        assert_eq!(core("ftp://registry.ollama.ai/library/m:latest"), "m");
    }

    #[test]
    fn a_name_that_would_lose_everything_is_its_own_core() {
        for name in [":latest", "library/", "library/:latest", "https://", ""] {
            assert_eq!(core(name), name);
        }
        assert!(!same_model(":latest", ""));
        assert!(same_model(":LATEST", ":latest"));
        // Multi-byte text is cut only at a character's edge.
        assert_eq!(core("ü:latest"), "ü");
        assert_eq!(core("ééééééé"), "ééééééé");
        assert_eq!(core("libraryé/x"), "libraryé/x");
    }
}
