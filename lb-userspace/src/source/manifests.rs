//! YAML/JSON manifests as a source: files or directories of multi-document files holding
//! v1 Service, v1 Endpoints, discovery.k8s.io/v1 EndpointSlice and v1 List objects.
//!
//! A bad file or object never takes the others down: it is reported (file, document, object,
//! field) and skipped, and the last good version of it, if there was one, stays in force, as
//! the API server keeps the stored object when an update is rejected.
//!
//! This module finds the files and reads only those that changed (by stamp); the layers under
//! it each have one job: `documents.rs` bytes to bounded documents, `objects.rs` documents to
//! validated objects, `assembly.rs` the files' objects to one snapshot, kept incrementally
//! ([`assemble`] here is its from-scratch reference).

use std::{
    collections::{BTreeMap, HashSet},
    fmt, fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use imbl::OrdMap;

pub(super) use super::objects::{FileObjects, Kind, Object};
use super::{
    assembly::{Assembly, Rank},
    convert::NodePortRange,
    documents::{self, BOUNDS},
    objects::{documents_error, parse_file},
};
use crate::model::{EndpointSlice, ObjectKey, Snapshot};

/// Something wrong in the manifests, located as precisely as it can be.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number in a multi-document file, when the error is in one.
    pub document: Option<usize>,
    /// "Service shop/web", when the object could be named.
    pub object: Option<String>,
    /// Field path in the object, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(doc) = self.document {
            write!(f, " (document {doc})")?;
        }
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl ManifestError {
    /// A problem with the manifests as a whole (named by their first path).
    pub fn internal(paths: &[PathBuf], message: &str) -> Self {
        file_error(
            paths.first().map_or(Path::new("-"), PathBuf::as_path),
            message,
        )
    }
}

/// What identifies a version of a file without reading it: a rewrite in place changes the
/// times or size, an editor's or ConfigMap's replace-by-rename changes the inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(file: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(file).ok()?;
    Some(Stamp {
        inode: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// A file as last read: its stamp, its (last good) objects and what was wrong in it.
#[derive(Clone, Debug)]
struct Cached {
    stamp: Option<Stamp>,
    /// Where the file's objects sit in the merge order.
    rank: Rank,
    objects: FileObjects,
    errors: Vec<ManifestError>,
}

/// The manifest source: the configured paths and, per file, the last good objects. A file
/// whose stamp did not change is not read again, so its objects keep their identity (the
/// syncer then knows they did not change without comparing them).
#[derive(Debug, Default)]
pub struct Manifests {
    paths: Vec<PathBuf>,
    files: BTreeMap<PathBuf, Cached>,
    /// The last snapshot loaded; the next is built on it, sharing what did not change.
    last: Snapshot,
    /// Node ports outside it are errors (`--nodeport-range`).
    node_ports: NodePortRange,
    /// The files' objects merged, kept up to date file by file.
    assembly: Assembly,
}

impl Manifests {
    pub fn new(paths: Vec<PathBuf>) -> Self {
        Self {
            paths,
            files: BTreeMap::new(),
            last: Snapshot::default(),
            node_ports: NodePortRange::default(),
            assembly: Assembly::default(),
        }
    }

    /// Validates node ports against `range` instead of the default 30000-32767.
    #[must_use]
    pub fn with_node_port_range(mut self, range: NodePortRange) -> Self {
        self.node_ports = range;
        self
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The last snapshot [`Manifests::load`] returned.
    pub fn last(&self) -> &Snapshot {
        &self.last
    }

    /// Reads every changed file again and returns the resulting snapshot (sharing structure
    /// with the previous one) and what is wrong.
    pub fn load(&mut self) -> (Snapshot, Vec<ManifestError>) {
        let mut errors = Vec::new();
        let mut files: BTreeMap<PathBuf, Cached> = BTreeMap::new();
        let mut order: Vec<Rank> = Vec::new();
        for (arg, path) in self.paths.iter().enumerate() {
            match list_files(path) {
                Ok(found) => order.extend(found.into_iter().map(|f| (arg, f))),
                Err(e) => {
                    errors.push(e);
                    // The directory may be back next time; keep what it held meanwhile.
                    for (file, cached) in &self.files {
                        if file.starts_with(path) && !files.contains_key(file) {
                            order.push(cached.rank.clone());
                            files.insert(file.clone(), cached.clone());
                        }
                    }
                }
            }
        }
        // Which files to read: those whose stamp changed (or that are new). The reading and
        // parsing runs on several threads (a first load reads every file); the results are
        // merged in `order`, as one thread would.
        let mut reads: Vec<Read> = Vec::new();
        let mut seen: HashSet<&PathBuf> = HashSet::new();
        for rank in &order {
            let file = &rank.1;
            if files.contains_key(file) || !seen.insert(file) {
                continue;
            }
            let previous = self.files.remove(file);
            let now = stamp(file);
            match previous {
                Some(cached) if now.is_some() && cached.stamp == now && cached.rank == *rank => {
                    files.insert(file.clone(), cached);
                }
                previous => reads.push(Read {
                    rank: rank.clone(),
                    stamp: now,
                    previous,
                }),
            }
        }
        let parsed = parse_files(&reads, self.node_ports);
        for (read, (objects, file_errors)) in reads.into_iter().zip(parsed) {
            let rank = &read.rank;
            let (previous_rank, previous) = match read.previous {
                Some(c) => (Some(c.rank), Some(c.objects)),
                None => (None, None),
            };
            match previous_rank {
                Some(old_rank) if old_rank == *rank => {
                    self.assembly
                        .replace(rank, previous.as_ref(), Some(&objects));
                }
                Some(old_rank) => {
                    self.assembly.replace(&old_rank, previous.as_ref(), None);
                    self.assembly.replace(rank, None, Some(&objects));
                }
                None => self.assembly.replace(rank, None, Some(&objects)),
            }
            files.insert(
                rank.1.clone(),
                Cached {
                    stamp: read.stamp,
                    rank: rank.clone(),
                    objects,
                    errors: file_errors,
                },
            );
        }
        // Files that are gone.
        for cached in std::mem::take(&mut self.files).into_values() {
            self.assembly
                .replace(&cached.rank, Some(&cached.objects), None);
        }
        order.sort();
        for rank in &order {
            if let Some(cached) = files.get(&rank.1) {
                errors.extend(cached.errors.iter().cloned());
            }
        }
        errors.extend(self.assembly.duplicates());
        self.files = files;
        let snapshot = self.assembly.snapshot().clone();
        self.last = snapshot.clone();
        (snapshot, errors)
    }
}

/// A file [`Manifests::load`] reads again: where it ranks, its new stamp, and what it held.
struct Read {
    rank: Rank,
    stamp: Option<Stamp>,
    previous: Option<Cached>,
}

/// Threads that read and parse manifest files (parsing is most of a first load).
const PARSE_THREADS: usize = 4;

/// Reads and parses each file of `reads` (its objects, or its previous ones where it cannot
/// be read, and what is wrong), in `reads`' order, on up to [`PARSE_THREADS`] threads.
fn parse_files(
    reads: &[Read],
    node_ports: NodePortRange,
) -> Vec<(FileObjects, Vec<ManifestError>)> {
    let one = |read: &Read| {
        let file = &read.rank.1;
        let previous = read.previous.as_ref().map(|c| &c.objects);
        let mut file_errors = Vec::new();
        let objects = match documents::read_text(file, &BOUNDS) {
            Ok(text) => parse_file(file, &text, previous, node_ports, &mut file_errors),
            Err(e) => {
                file_errors.push(documents_error(file, e, previous.is_some()));
                previous.cloned().unwrap_or_default()
            }
        };
        (objects, file_errors)
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(PARSE_THREADS)
        .min(reads.len());
    if threads <= 1 {
        return reads.iter().map(one).collect();
    }
    // Contiguous shares of equal length: files are of similar size (the bench's, a
    // generator's); a skewed directory costs at most its largest share.
    let share = reads.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = reads
            .chunks(share)
            .map(|part| scope.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                // A panic while parsing (a bug) goes on to the caller, as on one thread: the
                // watcher turns it into an error and keeps the last snapshot.
                handle
                    .join()
                    .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
            })
            .collect()
    })
}

/// One manifest file's text as [`Manifests::load`] reads it (every bound and check; `file`
/// names it in errors, and a `.json` extension selects JSON): the snapshot it alone makes
/// and what is wrong in it. The fuzz target `manifest_file` drives this.
pub fn load_text(file: &Path, text: &str) -> (Snapshot, Vec<ManifestError>) {
    let mut errors = Vec::new();
    let objects = parse_file(file, text, None, NodePortRange::default(), &mut errors);
    let path = file.to_owned();
    let files = BTreeMap::from([(&path, &objects)]);
    let snapshot = assemble(std::slice::from_ref(&path), &files, &mut errors);
    (snapshot, errors)
}

fn file_error(file: &Path, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_owned(),
        document: None,
        object: None,
        field: None,
        message: message.into(),
    }
}

/// Whether a directory entry is a manifest: `.yaml`, `.yml` or `.json`, not hidden (which
/// also skips the `..data` links of a mounted ConfigMap).
fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml" | "json"))
}

/// The files behind a `--manifests` path: the file itself, or a directory's manifests
/// (not recursive, like `kubectl apply -f DIR`), sorted.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = fs::metadata(path).map_err(|e| file_error(path, format!("cannot read: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = fs::read_dir(path).map_err(|e| file_error(path, format!("cannot list: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| file_error(path, format!("cannot list: {e}")))?;
        let file = entry.path();
        if is_manifest(&file) && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Merges the files' objects into one snapshot: a Service or EndpointSlice defined in two
/// files is an error (the first file wins); v1 Endpoints count only for Services without
/// EndpointSlices, as the mirroring controller would not mirror them otherwise.
fn assemble(
    order: &[PathBuf],
    files: &BTreeMap<&PathBuf, &FileObjects>,
    errors: &mut Vec<ManifestError>,
) -> Snapshot {
    let mut snapshot = Snapshot::default();
    let mut slices: BTreeMap<ObjectKey, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    let mut origin: BTreeMap<(Kind, ObjectKey), &Path> = BTreeMap::new();
    let mut from_endpoints: BTreeMap<ObjectKey, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for file in order {
        let Some(objects) = files.get(file) else {
            continue;
        };
        for (key, object) in *objects {
            if let Some(first) = origin.get(key) {
                if *first != file.as_path() {
                    errors.push(ManifestError {
                        file: file.clone(),
                        document: None,
                        object: Some(format!("{} {}", key.0, key.1)),
                        field: None,
                        message: format!("also defined in {}; that one is used", first.display()),
                    });
                }
                continue;
            }
            origin.insert(key.clone(), file);
            match object {
                Object::Service(svc) => {
                    snapshot.services.insert(key.1.clone(), svc.clone());
                    snapshot
                        .origins
                        .insert(key.1.clone(), Arc::from(file.display().to_string()));
                }
                Object::Slice(Some(slice)) => {
                    slices
                        .entry(slice.service.clone())
                        .or_default()
                        .push(slice.clone());
                }
                Object::Slice(None) => {}
                Object::Endpoints(slices) => {
                    from_endpoints.insert(key.1.clone(), slices.clone());
                }
            }
        }
    }
    for (service, from_endpoints) in from_endpoints {
        slices.entry(service).or_insert(from_endpoints);
    }
    for list in slices.values_mut() {
        list.sort_by(|a, b| a.key.cmp(&b.key));
    }
    snapshot.slices = OrdMap::from(slices);
    snapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("lb-manifests-{name}-{}", std::process::id()));
            let _ignored = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
        fn remove(&self, name: &str) {
            let _absent = fs::remove_file(self.0.join(name));
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ignored = fs::remove_dir_all(&self.0);
        }
    }

    const WEB: &str = "
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.1.0.1]}]
";

    #[test]
    fn multi_document_file() {
        let dir = Dir::new("multi");
        dir.write("web.yaml", WEB);
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert!(errors.is_empty(), "{errors:?}");
        let key = ObjectKey::new("default", "web");
        assert!(snap.services.contains_key(&key));
        assert_eq!(snap.slices_of(&key).len(), 1);
    }

    #[test]
    fn list_items_and_endpoints() {
        let dir = Dir::new("list");
        dir.write(
            "list.yaml",
            "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: ext}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
- apiVersion: v1
  kind: Endpoints
  metadata: {name: ext}
  subsets: [{addresses: [{ip: 192.0.2.1}], ports: [{port: 80}]}]
",
        );
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.slices_of(&ObjectKey::new("default", "ext")).len(), 1);
    }

    #[test]
    fn bad_object_is_reported_with_file_document_object_and_field() {
        let dir = Dir::new("bad");
        let file = dir.write(
            "bad.yaml",
            "
apiVersion: v1
kind: Service
metadata: {name: ok}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: shop}
spec: {clusterIP: 10.96.0.4, ports: [{port: 99999}]}
",
        );
        let (snap, errors) = Manifests::new(vec![file.clone()]).load();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(errors.len(), 1);
        let e = &errors[0];
        assert_eq!(e.document, Some(2));
        assert_eq!(e.object.as_deref(), Some("Service shop/broken"));
        assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
        let text = e.to_string();
        assert!(text.starts_with(&file.display().to_string()), "{text}");
        assert!(text.contains("99999 is out of range"), "{text}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let dir = Dir::new("types");
        let file = dir.write("t.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: t}\nspec: {clusterIP: 10.0.0.1, ports: [{port: eighty}]}\n");
        let (_, errors) = Manifests::new(vec![file]).load();
        assert_eq!(
            errors[0].field.as_deref(),
            Some("spec.ports[0].port"),
            "{errors:?}"
        );
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let dir = Dir::new("kind");
        dir.write(
            "d.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
        );
        let (_, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .message
                .contains("unsupported kind apps/v1 Deployment"),
            "{errors:?}"
        );
    }

    #[test]
    fn broken_yaml_keeps_the_last_good_file_and_others_load() {
        let dir = Dir::new("yaml");
        let web = dir.write("web.yaml", WEB);
        dir.write("other.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: other}\nspec: {clusterIP: 10.96.0.9, ports: [{port: 53, protocol: UDP}]}\n");
        let mut manifests = Manifests::new(vec![dir.0.clone()]);
        let (first, errors) = manifests.load();
        assert!(errors.is_empty());
        fs::write(
            &web,
            "apiVersion: v1\nkind: Service\nmetadata: {name: web\n  spec: [",
        )
        .unwrap();
        let (second, errors) = manifests.load();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.starts_with("invalid YAML"));
        assert_eq!(first, second);
    }

    #[test]
    fn invalid_update_keeps_the_previous_object() {
        let dir = Dir::new("update");
        let file = dir.write("s.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}\n");
        let mut manifests = Manifests::new(vec![file.clone()]);
        let (first, _) = manifests.load();
        fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 0}]}\n").unwrap();
        let (second, errors) = manifests.load();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("keeping the last valid version"));
        assert_eq!(first, second);
        // A deleted object goes away.
        fs::write(&file, "").unwrap();
        let (third, errors) = manifests.load();
        assert!(errors.is_empty());
        assert!(third.services.is_empty());
    }

    #[test]
    fn duplicates_across_files_keep_the_first() {
        let dir = Dir::new("dup");
        dir.write("a.yaml", WEB);
        dir.write("b.yaml", WEB);
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert_eq!(snap.services.len(), 1);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].message.contains("also defined in"));
    }

    #[test]
    fn slices_win_over_endpoints() {
        let dir = Dir::new("mirror");
        dir.write("web.yaml", WEB);
        dir.write("eps.yaml", "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web}\nsubsets: [{addresses: [{ip: 10.9.9.9}], ports: [{port: 80}]}]\n");
        let (snap, _) = Manifests::new(vec![dir.0.clone()]).load();
        let slices = snap.slices_of(&ObjectKey::new("default", "web"));
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].key.name, "web-a");
    }

    #[test]
    fn hidden_and_foreign_files_are_skipped() {
        let dir = Dir::new("skip");
        dir.write(".hidden.yaml", "garbage: [");
        dir.write("README.md", "# not a manifest");
        dir.write("web.yml", WEB);
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services.len(), 1);
    }

    #[test]
    fn unchanged_files_keep_their_objects() {
        let dir = Dir::new("cache");
        dir.write("a.yaml", WEB);
        dir.write(
            "b.yaml",
            &WEB.replace("web", "api").replace("10.96.0.1", "10.96.0.2"),
        );
        let mut manifests = Manifests::new(vec![dir.0.clone()]);
        let (first, _) = manifests.load();
        std::thread::sleep(std::time::Duration::from_millis(10));
        dir.write(
            "b.yaml",
            &WEB.replace("web", "api").replace("10.96.0.1", "10.96.0.3"),
        );
        let (second, _) = manifests.load();
        let web = ObjectKey::new("default", "web");
        let api = ObjectKey::new("default", "api");
        assert!(
            Arc::ptr_eq(&first.services[&web], &second.services[&web]),
            "a.yaml was read again"
        );
        assert!(!Arc::ptr_eq(&first.services[&api], &second.services[&api]));
        assert_ne!(first.services[&api], second.services[&api]);
    }

    #[test]
    fn json_files_and_json_errors() {
        let dir = Dir::new("json");
        dir.write(
            "list.json",
            r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "j"},
             "spec": {"clusterIP": "10.96.0.7", "ports": [{"port": 80}]}}]}"#,
        );
        dir.write("bad.json", r#"{"apiVersion": "v1", "kind": "Service", "#);
        dir.write(
            "typo.json",
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "t"},
            "spec": {"clusterIP": "10.96.0.8", "ports": [{"port": "eighty"}]}}"#,
        );
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert!(snap.services.contains_key(&ObjectKey::new("default", "j")));
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].message.starts_with("invalid JSON"), "{errors:?}");
        assert_eq!(errors[1].object.as_deref(), Some("Service default/t"));
        assert_eq!(
            errors[1].field.as_deref(),
            Some("spec.ports[0].port"),
            "{errors:?}"
        );
    }

    #[test]
    fn a_file_over_a_bound_is_one_error_and_the_others_load() {
        let dir = Dir::new("hostile");
        dir.write("web.yaml", WEB);
        let deep = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}1{}\n",
            "{a: ".repeat(100_000),
            "}".repeat(100_000)
        );
        let hostile = dir.write("deep.yaml", &deep);
        dir.write(
            "deep.json",
            &format!("{}1{}", "{\"a\": ".repeat(100_000), "}".repeat(100_000)),
        );
        let mut manifests = Manifests::new(vec![dir.0.clone()]);
        let (snap, errors) = manifests.load();
        assert_eq!(snap.services.len(), 1, "web.yaml is applied");
        assert_eq!(errors.len(), 2, "{errors:?}");
        for e in &errors {
            let text = e.to_string();
            assert!(
                text.contains("nesting deeper than lb's bound of 64 levels"),
                "{text}"
            );
        }
        assert_eq!(errors[1].file, hostile);
        // A later change to another file is applied while the hostile files stay.
        dir.write(
            "api.yaml",
            &WEB.replace("web", "api").replace("10.96.0.1", "10.96.0.2"),
        );
        let (snap, errors) = manifests.load();
        assert_eq!(snap.services.len(), 2);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn a_fifo_is_an_error_not_a_hang() {
        let dir = Dir::new("fifo");
        let fifo = dir.0.join("pipe.yaml");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates a directory entry.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Named directly (a directory's FIFOs are not manifests: not regular files).
        let (_, errors) = Manifests::new(vec![fifo.clone(), dir.0.clone()]).load();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("a FIFO"), "{errors:?}");
    }

    #[test]
    fn a_contested_frontend_names_both_services_and_both_files() {
        let dir = Dir::new("contest");
        let a = dir.write("a.yaml", WEB);
        let b = dir.write(
            "b.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: shop}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        );
        let (snap, errors) = Manifests::new(vec![dir.0.clone()]).load();
        assert!(errors.is_empty(), "{errors:?}");
        let (_, problems) = crate::desired::build(
            &snap,
            &crate::model::Node::default(),
            crate::desired::Limits::default(),
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].describe(&snap);
        for needle in [
            "Service default/web".to_owned(),
            "Service shop/other".to_owned(),
            a.display().to_string(),
            b.display().to_string(),
            "10.96.0.1:80/TCP".to_owned(),
        ] {
            assert!(text.contains(&needle), "{needle:?} missing from {text}");
        }
    }

    #[test]
    fn node_ports_outside_the_range_are_errors() {
        let dir = Dir::new("range");
        let file = dir.write(
            "np.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec: {type: NodePort, clusterIP: 10.96.0.60, ports: [{port: 80, nodePort: 8080}]}\n",
        );
        let (snap, errors) = Manifests::new(vec![file.clone()]).load();
        assert!(snap.services.is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field.as_deref(), Some("spec.ports[0].nodePort"));
        assert!(
            errors[0]
                .message
                .contains("8080 is outside the node port range 30000-32767"),
            "{errors:?}"
        );
        let (snap, errors) = Manifests::new(vec![file])
            .with_node_port_range("8000-9000".parse().unwrap())
            .load();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(snap.services.len(), 1);
    }

    /// 300 random steps over five files defining overlapping Services, EndpointSlices (moving
    /// between Services) and Endpoints, files coming and going: after each load the
    /// incrementally kept snapshot and errors equal a from-scratch [`assemble`].
    #[test]
    fn incremental_assembly_matches_assembling_from_scratch() {
        let dir = Dir::new("assembly");
        let mut next = crate::test_support::xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut manifests = Manifests::new(vec![dir.0.clone()]);
        let (mut duplicates, mut with_slices) = (0, 0);
        for step in 0..300 {
            let file = format!("f{}.yaml", next(5));
            if next(6) == 0 {
                dir.remove(&file);
            } else {
                let mut docs = Vec::new();
                for _ in 0..next(4) {
                    let n = next(4);
                    docs.push(match next(3) {
                        0 => format!(
                            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}}}\nspec: {{clusterIP: 10.96.0.{}, ports: [{{port: 80}}]}}",
                            next(3) + 1
                        ),
                        1 => format!(
                            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: sl{n}, labels: {{kubernetes.io/service-name: s{}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.1.0.{}]}}]",
                            next(4),
                            next(3) + 1
                        ),
                        _ => format!(
                            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: s{n}}}\nsubsets: [{{addresses: [{{ip: 10.2.0.{}}}], ports: [{{port: 80}}]}}]",
                            next(3) + 1
                        ),
                    });
                }
                dir.write(&file, &docs.join("\n---\n"));
            }
            // Files rewritten within one clock tick keep their stamp: make each write show.
            std::thread::sleep(std::time::Duration::from_millis(2));
            let (snapshot, mut errors) = manifests.load();
            let mut ranks: Vec<&Rank> = manifests.files.values().map(|c| &c.rank).collect();
            ranks.sort();
            let order: Vec<PathBuf> = ranks.iter().map(|r| r.1.clone()).collect();
            let objects: BTreeMap<&PathBuf, &FileObjects> = manifests
                .files
                .iter()
                .map(|(f, c)| (f, &c.objects))
                .collect();
            let mut want_errors: Vec<ManifestError> = order
                .iter()
                .flat_map(|f| manifests.files[f].errors.iter().cloned())
                .collect();
            let want = assemble(&order, &objects, &mut want_errors);
            assert_eq!(snapshot.services, want.services, "step {step}");
            assert_eq!(snapshot.slices, want.slices, "step {step}");
            assert_eq!(snapshot.origins, want.origins, "step {step}");
            errors.sort_by_key(ToString::to_string);
            want_errors.sort_by_key(ToString::to_string);
            assert_eq!(errors, want_errors, "step {step}");
            duplicates += usize::from(errors.iter().any(|e| e.message.contains("also defined")));
            with_slices += usize::from(!snapshot.slices.is_empty());
        }
        assert!(
            duplicates > 50 && with_slices > 50,
            "{duplicates} {with_slices}"
        );
    }

    #[test]
    fn missing_path_is_an_error() {
        let (_, errors) = Manifests::new(vec![PathBuf::from("/nonexistent/lb.yaml")]).load();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("/nonexistent/lb.yaml: cannot read")
        );
    }
}
