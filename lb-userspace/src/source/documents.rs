//! The document layer of the manifest source: one file's bytes to its documents, YAML or
//! JSON, within fixed bounds.
//!
//! A manifest directory is an input anyone with write access to it controls, and the agent
//! must keep applying every other file whatever one file holds. So reading and parsing a file
//! is bounded in every dimension that could make it slow or large: the file's size, the
//! nesting depth, the number of documents, the number of nodes and parser events, and alias
//! expansion (a "billion laughs" file is small and expands without end). A file that breaks a
//! bound is one error naming the file and the bound, and nothing of it is used; the cost of
//! finding that out is linear in the bytes read, which are themselves bounded.
//!
//! The API server's own limits are far below these: a request body is at most 3 MiB, and
//! Kubernetes objects nest a dozen levels at most (`spec.template.spec.containers[0]...`).

use std::{
    fs,
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

use serde_json::value::RawValue;

/// The bounds every manifest file is read within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Bytes in one file. The bench's largest generated file (a `v1 List` of 10 000 Services
    /// and their slices) is about 9 MiB.
    pub max_file_bytes: u64,
    /// Nesting of mappings and sequences (JSON objects and arrays) in one document.
    pub max_depth: usize,
    /// Documents in one multi-document file (`---` separators; JSON values one after another).
    pub max_documents: usize,
    /// YAML nodes (mappings, sequences, scalars) in one file.
    pub max_nodes: usize,
    /// YAML alias references (`*name`) in one file.
    pub max_aliases: usize,
    /// Nodes that alias expansion may add to one file in total.
    pub max_alias_expansion: usize,
}

/// The bounds `lb run` and `lb check` use.
pub const BOUNDS: Bounds = Bounds {
    max_file_bytes: 64 << 20,
    max_depth: 64,
    max_documents: 100_000,
    max_nodes: 16_000_000,
    max_aliases: 1_000,
    max_alias_expansion: 100_000,
};

/// Why a file's documents could not be had. The message says what is wrong and, for a
/// broken bound, which bound and its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DocumentsError {
    /// The file could not be opened or read, or is not a regular file.
    #[error("cannot read: {0}")]
    Read(String),
    /// The file breaks one of [`Bounds`].
    #[error("{0}")]
    Bound(String),
    /// A syntax error; `document` is 1-based when known.
    #[error("{message}")]
    Syntax {
        document: Option<usize>,
        message: String,
    },
}

impl DocumentsError {
    /// The 1-based document the error is in, when known.
    pub fn document(&self) -> Option<usize> {
        match self {
            Self::Syntax { document, .. } => *document,
            Self::Read(_) | Self::Bound(_) => None,
        }
    }
}

/// Reads a manifest file as UTF-8 text, refusing anything that is not a regular file (a FIFO
/// would block the reader forever, a device may never end) and anything larger than
/// `bounds.max_file_bytes`.
///
/// # Errors
/// [`DocumentsError::Read`] when the file cannot be opened or read, is not a regular file or
/// not UTF-8; [`DocumentsError::Bound`] when it is too large.
pub fn read_text(file: &Path, bounds: &Bounds) -> Result<String, DocumentsError> {
    // O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting for one.
    let handle = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(file)
        .map_err(|e| DocumentsError::Read(e.to_string()))?;
    let meta = handle
        .metadata()
        .map_err(|e| DocumentsError::Read(e.to_string()))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(DocumentsError::Read(format!(
            "{what}; lb reads regular files only"
        )));
    }
    let too_large = |size: u64| {
        DocumentsError::Bound(format!(
            "the file is {size} bytes, over lb's bound of {} bytes per manifest file",
            bounds.max_file_bytes
        ))
    };
    if meta.len() > bounds.max_file_bytes {
        return Err(too_large(meta.len()));
    }
    // The file may grow between the stat and the read: read at most one byte past the bound.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    handle
        .take(bounds.max_file_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| DocumentsError::Read(e.to_string()))?;
    if bytes.len() as u64 > bounds.max_file_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes)
        .map_err(|e| DocumentsError::Read(format!("not UTF-8 text: {}", e.utf8_error())))
}

/// The YAML documents of `text`, each as a JSON-shaped value (manifests have string keys;
/// empty documents are skipped).
///
/// # Errors
/// [`DocumentsError::Bound`] when the text breaks a bound, [`DocumentsError::Syntax`] when
/// it is not YAML (or has a non-string key, an unknown tag, ...).
pub fn yaml_documents(
    text: &str,
    bounds: &Bounds,
) -> Result<Vec<serde_json::Value>, DocumentsError> {
    let mut options = serde_saphyr::Options::default();
    let mut budget = serde_saphyr::Budget::default();
    budget.max_reader_input_bytes = usize::try_from(bounds.max_file_bytes).ok();
    budget.max_depth = bounds.max_depth;
    // One past the depth bound, so that too deep a flow collection is reported as the depth
    // bound rather than as the parser's own nesting error.
    budget.flow_nesting_limit = bounds.max_depth.saturating_add(1);
    budget.max_documents = bounds.max_documents;
    budget.max_nodes = bounds.max_nodes;
    // Every node is at least one event, a mapping or sequence two.
    budget.max_events = bounds.max_nodes.saturating_mul(2);
    budget.max_aliases = bounds.max_aliases;
    budget.max_anchors = bounds.max_aliases;
    budget.max_recorded_anchor_events = bounds.max_alias_expansion;
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = bounds.max_alias_expansion;
    // One line per problem: the agent logs it, `lb check` prints it.
    options.with_snippet = false;
    serde_saphyr::from_multiple_with_options::<serde_json::Value>(text, options)
        .map_err(|e| yaml_error(&e, bounds))
}

fn yaml_error(e: &serde_saphyr::Error, bounds: &Bounds) -> DocumentsError {
    use serde_saphyr::budget::BudgetBreach as B;
    if let serde_saphyr::Error::Budget { breach, .. } = e {
        let bound = match breach {
            B::Depth { .. } => format!(
                "nesting deeper than lb's bound of {} levels",
                bounds.max_depth
            ),
            B::Documents { .. } => format!(
                "more than lb's bound of {} documents in one file",
                bounds.max_documents
            ),
            B::Nodes { .. } | B::Events { .. } => format!(
                "more than lb's bound of {} YAML nodes in one file",
                bounds.max_nodes
            ),
            B::Aliases { .. } | B::Anchors { .. } => format!(
                "more than lb's bound of {} YAML aliases or anchors in one file",
                bounds.max_aliases
            ),
            other => format!("alias expansion or size over lb's bounds for one file ({other:?})"),
        };
        return DocumentsError::Bound(bound);
    }
    let message = e.to_string();
    // The parser's own nesting limit (set from the depth bound) trips before the budget's.
    if message.contains("recursion limit") {
        return DocumentsError::Bound(format!(
            "nesting deeper than lb's bound of {} levels",
            bounds.max_depth
        ));
    }
    // Breaches found while replaying aliases come wrapped with the alias's location.
    if message.contains("budget breached") || message.contains("replay") {
        return DocumentsError::Bound(format!(
            "over lb's bounds for one file (alias expansion at most {} nodes, {} aliases, depth \
             {}): {message}",
            bounds.max_alias_expansion, bounds.max_aliases, bounds.max_depth
        ));
    }
    DocumentsError::Syntax {
        document: None,
        message: format!("invalid YAML: {message}"),
    }
}

/// The JSON values of `text` (one, or several one after the other), kept as raw text so
/// typed objects can be deserialized from them directly.
///
/// # Errors
/// [`DocumentsError::Bound`] for nesting deeper than `bounds.max_depth` or more than
/// `bounds.max_documents` values, [`DocumentsError::Syntax`] for invalid JSON.
pub fn json_documents<'t>(
    text: &'t str,
    bounds: &Bounds,
) -> Result<Vec<&'t RawValue>, DocumentsError> {
    let depth = json_depth(text.as_bytes());
    if depth > bounds.max_depth {
        return Err(DocumentsError::Bound(format!(
            "nesting deeper than lb's bound of {} levels",
            bounds.max_depth
        )));
    }
    let mut out = Vec::new();
    for (i, value) in serde_json::Deserializer::from_str(text)
        .into_iter::<&RawValue>()
        .enumerate()
    {
        if i >= bounds.max_documents {
            return Err(DocumentsError::Bound(format!(
                "more than lb's bound of {} documents in one file",
                bounds.max_documents
            )));
        }
        out.push(value.map_err(|e| DocumentsError::Syntax {
            document: Some(i + 1),
            message: format!("invalid JSON: {e}"),
        })?);
    }
    Ok(out)
}

/// The deepest nesting of `{`/`[` in JSON text, outside strings; one pass, no recursion.
/// Malformed text gives some number: the parser reports the syntax error afterwards.
fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// `{a: {a: ... 1 ... }}` nested `n` deep, optionally under a Service's `spec:`.
    fn nested_flow(n: usize, under_spec: bool) -> String {
        let inner = format!("{}1{}", "{a: ".repeat(n), "}".repeat(n));
        if under_spec {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {inner}\n")
        } else {
            inner
        }
    }

    fn nested_block(n: usize) -> String {
        let mut s = String::new();
        for i in 0..n {
            s.push_str(&" ".repeat(i));
            s.push_str("a:\n");
        }
        s
    }

    fn nested_json(n: usize) -> String {
        format!("{}1{}", "{\"a\": ".repeat(n), "}".repeat(n))
    }

    /// Parses in a thread and fails the test if that takes longer than `limit`: a hang must
    /// fail, not stall the test run.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _gone = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("parsing did not finish within {limit:?}"))
    }

    fn bound_error(result: Result<impl std::fmt::Debug, DocumentsError>, needle: &str) {
        match result {
            Err(DocumentsError::Bound(message)) => {
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("expected a bound error with {needle:?}, got {other:?}"),
        }
    }

    /// Deep YAML nesting is refused within 10 s, whatever the depth.
    #[rstest::rstest]
    #[case::flow_100k(nested_flow(100_000, false))]
    #[case::flow_100k_under_spec(nested_flow(100_000, true))]
    #[case::flow_65(nested_flow(65, true))]
    #[case::block_200(nested_block(200))]
    fn hostile_yaml_nesting_is_refused_quickly(#[case] text: String) {
        let started = Instant::now();
        let result = within(Duration::from_secs(10), move || {
            yaml_documents(&text, &BOUNDS)
        });
        bound_error(result, "nesting deeper than lb's bound of 64 levels");
        eprintln!("refused in {:?}", started.elapsed());
    }

    /// The same for JSON.
    #[rstest::rstest]
    #[case::json_100k(nested_json(100_000))]
    #[case::json_100k_under_spec(format!(
        "{{\"kind\": \"Service\", \"spec\": {}}}",
        nested_json(100_000)
    ))]
    fn hostile_json_nesting_is_refused_quickly(#[case] text: String) {
        let result = within(Duration::from_secs(10), move || {
            json_documents(&text, &BOUNDS).map(|d| d.len())
        });
        bound_error(result, "nesting deeper than lb's bound of 64 levels");
    }

    #[test]
    fn nesting_within_the_bound_is_read() {
        let docs = yaml_documents(&nested_flow(60, true), &BOUNDS).unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(json_documents(&nested_json(60), &BOUNDS).unwrap().len(), 1);
    }

    #[test]
    fn alias_bomb_is_refused() {
        // Each level references the previous one ten times: 10^9 nodes once expanded.
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            let refs = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let result = within(Duration::from_secs(10), move || {
            yaml_documents(&text, &BOUNDS).map(|d| d.len())
        });
        match result {
            Err(DocumentsError::Bound(_)) => {}
            other => panic!("expected a bound error, got {other:?}"),
        }
    }

    #[test]
    fn document_count_is_bounded() {
        let bounds = Bounds {
            max_documents: 10,
            ..BOUNDS
        };
        let yaml = "---\na: 1\n".repeat(11);
        bound_error(yaml_documents(&yaml, &bounds), "10 documents");
        let json = "{}\n".repeat(11);
        bound_error(json_documents(&json, &bounds), "10 documents");
        assert_eq!(
            yaml_documents(&"---\na: 1\n".repeat(10), &bounds)
                .unwrap()
                .len(),
            10
        );
    }

    #[test]
    fn node_count_is_bounded() {
        let bounds = Bounds {
            max_nodes: 100,
            ..BOUNDS
        };
        let yaml = format!("[{}]", ["1"; 200].join(", "));
        bound_error(yaml_documents(&yaml, &bounds), "100 YAML nodes");
    }

    #[test]
    fn syntax_errors_are_syntax_errors() {
        let e = yaml_documents("a: [1, 2\n", &BOUNDS).unwrap_err();
        assert!(matches!(e, DocumentsError::Syntax { .. }), "{e:?}");
        assert!(e.to_string().starts_with("invalid YAML"), "{e}");
        let e = json_documents("{\"a\": 1} {\"b\": ", &BOUNDS).unwrap_err();
        assert_eq!(e.document(), Some(2));
    }

    #[test]
    fn empty_documents_are_skipped() {
        let docs = yaml_documents("---\na: 1\n---\n---\nb: 2\n", &BOUNDS).unwrap();
        assert_eq!(docs.len(), 2);
        assert!(yaml_documents("", &BOUNDS).unwrap().is_empty());
    }

    #[test]
    fn json_depth_ignores_brackets_in_strings() {
        assert_eq!(json_depth(br#"{"a": "{{{[[[\"{{"}"#), 1);
        assert_eq!(json_depth(br#"[[{"a": []}]]"#), 4);
    }

    struct Temp(std::path::PathBuf);
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ignored = fs::remove_file(&self.0);
        }
    }
    fn temp(name: &str) -> Temp {
        Temp(std::env::temp_dir().join(format!("lb-documents-{name}-{}", std::process::id())))
    }

    #[test]
    fn fifo_is_refused_without_blocking() {
        let fifo = temp("fifo.yaml");
        let path = std::ffi::CString::new(fifo.0.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates a directory entry.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let file = fifo.0.clone();
        let result = within(Duration::from_secs(5), move || read_text(&file, &BOUNDS));
        match result {
            Err(DocumentsError::Read(m)) => assert!(m.contains("a FIFO"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn size_is_bounded() {
        let file = temp("big.yaml");
        fs::write(&file.0, "a: 1\n".repeat(100)).unwrap();
        let bounds = Bounds {
            max_file_bytes: 100,
            ..BOUNDS
        };
        bound_error(read_text(&file.0, &bounds), "bound of 100 bytes");
        assert!(read_text(&file.0, &BOUNDS).is_ok());
        match read_text(Path::new("/dev/null"), &BOUNDS) {
            Err(DocumentsError::Read(m)) => assert!(m.contains("a device"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
