//! The kind dispatch of the manifest source: a file's documents (from the bounded document
//! layer, `documents.rs`) to the objects lb reads, each converted and validated
//! (`convert.rs`), with the file, document, object and field of every problem. An invalid
//! object keeps its previous version, as the API server keeps the stored object when an
//! update is rejected.

use std::{collections::BTreeMap, fmt, path::Path, sync::Arc};

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    convert::{self, FieldError, NodePortRange},
    documents::{self, BOUNDS, DocumentsError},
    manifests::ManifestError,
};
use crate::model::{EndpointSlice, ObjectKey, Service};

/// The kinds lb reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    Service,
    Endpoints,
    EndpointSlice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Service => "Service",
            Self::Endpoints => "Endpoints",
            Self::EndpointSlice => "EndpointSlice",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Object {
    Service(Arc<Service>),
    /// `None`: an FQDN slice, valid and ignored.
    Slice(Option<Arc<EndpointSlice>>),
    Endpoints(Vec<Arc<EndpointSlice>>),
}

/// The objects of one file, by identity.
pub(super) type FileObjects = BTreeMap<(Kind, ObjectKey), Object>;

/// Where in a file an object sits.
struct Location<'a> {
    file: &'a Path,
    document: usize,
    /// Field prefix for a `v1 List` item, e.g. `items[3].`.
    prefix: String,
    /// Node ports outside it are errors.
    node_ports: NodePortRange,
}

impl Location<'_> {
    fn error(
        &self,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) -> ManifestError {
        let field = match (field, self.prefix.is_empty()) {
            (Some(f), _) => Some(format!("{}{f}", self.prefix)),
            (None, false) => Some(self.prefix.trim_end_matches('.').to_owned()),
            (None, true) => None,
        };
        ManifestError {
            file: self.file.to_owned(),
            document: Some(self.document),
            object,
            field,
            message,
        }
    }
}

/// A file-level problem (unreadable, over a bound, not YAML/JSON); `kept` says whether the
/// file's last good objects stay in force.
pub(super) fn documents_error(file: &Path, e: DocumentsError, kept: bool) -> ManifestError {
    let document = e.document();
    let mut message = e.to_string();
    if kept {
        message.push_str(" (keeping the file's last good objects)");
    }
    ManifestError {
        file: file.to_owned(),
        document,
        object: None,
        field: None,
        message,
    }
}

/// Parses one file: `.json` files as JSON, everything else as multi-document YAML. On a
/// syntax error the file's previous objects stay (a half-written file must not remove
/// Services); an invalid object keeps its previous version.
pub(super) fn parse_file(
    file: &Path,
    text: &str,
    previous: Option<&FileObjects>,
    node_ports: NodePortRange,
    errors: &mut Vec<ManifestError>,
) -> FileObjects {
    fn each<D: Document>(
        file: &Path,
        documents: Vec<D>,
        previous: Option<&FileObjects>,
        node_ports: NodePortRange,
        errors: &mut Vec<ManifestError>,
    ) -> FileObjects {
        let mut objects = FileObjects::new();
        for (i, doc) in documents.into_iter().enumerate() {
            let at = Location {
                file,
                document: i + 1,
                prefix: String::new(),
                node_ports,
            };
            parse_value(&at, doc, previous, &mut objects, errors);
        }
        objects
    }
    let parsed = if file.extension().is_some_and(|e| e == "json") {
        documents::json_documents(text, &BOUNDS)
            .map(|docs| each(file, docs, previous, node_ports, errors))
    } else {
        documents::yaml_documents(text, &BOUNDS)
            .map(|docs| each(file, docs, previous, node_ports, errors))
    };
    parsed.unwrap_or_else(|e| {
        errors.push(documents_error(file, e, previous.is_some()));
        previous.cloned().unwrap_or_default()
    })
}

/// What the dispatch needs to know of a document before deserializing it.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: HeadMeta,
}

#[derive(Debug, Default, serde::Deserialize)]
struct HeadMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

/// One document or List item, however it was parsed: YAML as a JSON-shaped value, JSON as raw
/// text that typed objects are deserialized from directly (several times faster than building
/// a value tree first, which matters for big generated Lists).
trait Document: Sized {
    /// `None`: an empty document. `Err`: not an object.
    fn head(&self) -> Result<Option<Head>, ()>;
    /// Deserializes a typed object, naming the field that does not fit.
    fn typed<T: DeserializeOwned>(self) -> Result<T, FieldError>;
    /// The `items` of a `v1 List`.
    fn items(self) -> Option<Vec<Self>>;
}

fn field_error(path: &serde_path_to_error::Path, message: String) -> FieldError {
    let path = path.to_string();
    FieldError {
        field: if path == "." { String::new() } else { path },
        message,
    }
}

impl Document for Value {
    fn head(&self) -> Result<Option<Head>, ()> {
        if self.is_null() {
            return Ok(None);
        }
        if !self.is_object() {
            return Err(());
        }
        let text = |path: &[&str]| {
            path.iter()
                .try_fold(self, |v, key| v.get(*key))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(Some(Head {
            api_version: text(&["apiVersion"]),
            kind: text(&["kind"]),
            metadata: HeadMeta {
                name: text(&["metadata", "name"]),
                namespace: text(&["metadata", "namespace"]),
            },
        }))
    }

    fn typed<T: DeserializeOwned>(self) -> Result<T, FieldError> {
        serde_path_to_error::deserialize(self).map_err(|e| {
            let message = e.inner().to_string();
            field_error(e.path(), message)
        })
    }

    fn items(mut self) -> Option<Vec<Self>> {
        match self.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        }
    }
}

impl Document for &serde_json::value::RawValue {
    fn head(&self) -> Result<Option<Head>, ()> {
        let text = self.get().trim_start();
        if text.starts_with("null") {
            return Ok(None);
        }
        if !text.starts_with('{') {
            return Err(());
        }
        // Fields of the wrong type leave the head empty; the typed pass names them.
        Ok(Some(serde_json::from_str(self.get()).unwrap_or_default()))
    }

    fn typed<T: DeserializeOwned>(self) -> Result<T, FieldError> {
        let mut de = serde_json::Deserializer::from_str(self.get());
        serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let message = e.inner().to_string();
            field_error(e.path(), message)
        })
    }

    fn items(self) -> Option<Vec<Self>> {
        #[derive(serde::Deserialize)]
        struct List<'a> {
            #[serde(borrow)]
            items: Vec<&'a serde_json::value::RawValue>,
        }
        serde_json::from_str::<List<'_>>(self.get())
            .ok()
            .map(|l| l.items)
    }
}

fn parse_value<D: Document>(
    at: &Location<'_>,
    doc: D,
    previous: Option<&FileObjects>,
    objects: &mut FileObjects,
    errors: &mut Vec<ManifestError>,
) {
    let head = match doc.head() {
        Ok(Some(head)) => head,
        Ok(None) => return, // an empty document, e.g. after a trailing `---`
        Err(()) => {
            errors.push(at.error(
                None,
                None,
                "not an object (expected apiVersion, kind, metadata, ...)".into(),
            ));
            return;
        }
    };
    let kind = match (head.api_version.as_str(), head.kind.as_str()) {
        ("v1", "Service") => Kind::Service,
        ("v1", "Endpoints") => Kind::Endpoints,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "List") => {
            parse_list(at, doc, previous, objects, errors);
            return;
        }
        ("", _) | (_, "") => {
            errors.push(at.error(None, None, "missing apiVersion or kind".into()));
            return;
        }
        (api_version, kind) => {
            errors.push(at.error(
                None,
                Some("kind".into()),
                format!(
                    "unsupported kind {api_version} {kind}: lb reads v1 Service, v1 Endpoints, \
                     discovery.k8s.io/v1 EndpointSlice and v1 List"
                ),
            ));
            return;
        }
    };
    let name = head.metadata.name.as_str();
    let namespace = Some(head.metadata.namespace.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let identity = ObjectKey::new(namespace, name);
    let object_name = if name.is_empty() {
        format!("{kind} (unnamed)")
    } else {
        format!("{kind} {identity}")
    };
    let converted = match kind {
        Kind::Service => doc.typed().and_then(|s| {
            convert::service(&s)
                .and_then(|s| node_ports_in_range(&s, at.node_ports).map(|()| s))
                .map(|s| Object::Service(Arc::new(s)))
        }),
        Kind::Endpoints => doc.typed().and_then(|e| {
            convert::endpoints(&e)
                .map(|slices| Object::Endpoints(slices.into_iter().map(Arc::new).collect()))
        }),
        Kind::EndpointSlice => doc.typed().and_then(|e| {
            convert::endpoint_slice(&e).map(|slice| Object::Slice(slice.map(Arc::new)))
        }),
    };
    let key = (kind, identity);
    match converted {
        Ok(object) => {
            // An unchanged object keeps its identity, so the syncer skips it without a look.
            let object = match previous.and_then(|p| p.get(&key)) {
                Some(prev) if *prev == object => prev.clone(),
                _ => object,
            };
            if objects.insert(key, object).is_some() {
                errors.push(at.error(
                    Some(object_name),
                    None,
                    "defined twice in this file; the later one is used".into(),
                ));
            }
        }
        Err(FieldError { field, message }) => {
            let field = (!field.is_empty()).then_some(field);
            let kept = previous.and_then(|p| p.get(&key));
            let message = if kept.is_some() {
                format!("{message} (keeping the last valid version)")
            } else {
                message
            };
            errors.push(at.error(Some(object_name), field, message));
            if let Some(kept) = kept {
                objects.insert(key, kept.clone());
            }
        }
    }
}

/// Every `nodePort` of `service` within `range` (`--nodeport-range`), as the API server
/// allocates and validates them.
fn node_ports_in_range(service: &Service, range: NodePortRange) -> Result<(), FieldError> {
    for (i, sp) in service.ports.iter().enumerate() {
        if let Some(port) = sp.node_port.filter(|&p| !range.contains(p)) {
            return Err(FieldError {
                field: format!("spec.ports[{i}].nodePort"),
                message: format!(
                    "{port} is outside the node port range {range} (--nodeport-range)"
                ),
            });
        }
    }
    Ok(())
}

fn parse_list<D: Document>(
    at: &Location<'_>,
    doc: D,
    previous: Option<&FileObjects>,
    objects: &mut FileObjects,
    errors: &mut Vec<ManifestError>,
) {
    let Some(items) = doc.items() else {
        errors.push(at.error(
            Some("List".into()),
            Some("items".into()),
            "missing or not a list".into(),
        ));
        return;
    };
    for (i, item) in items.into_iter().enumerate() {
        let item_at = Location {
            file: at.file,
            document: at.document,
            prefix: format!("{}items[{i}].", at.prefix),
            node_ports: at.node_ports,
        };
        parse_value(&item_at, item, previous, objects, errors);
    }
}
