//! A stand-in for kube-apiserver (none can be installed here), speaking the real wire
//! protocol over plain HTTP/1.1 for the three resources lb watches: `v1` Services and Nodes
//! and `discovery.k8s.io/v1` EndpointSlices.
//!
//! - `GET .../services` lists with `metadata.resourceVersion` (label and field selectors).
//! - `GET ...?watch=true&resourceVersion=N` streams newline-delimited JSON watch events
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) over chunked encoding, from after `N`.
//!   A version older than the kept history gets an `ERROR` event with a 410 Status
//!   ("too old resource version"), as the real server does, which forces a relist.
//! - Tests change objects, compact the history, drop every open watch, or take the whole
//!   server down (requests fail with 503, open watches end) to simulate outages.
//!
//! Threads, not async: each connection is served by its own thread.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn of_kind(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Services => ("v1", "ServiceList"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Self::Nodes => ("v1", "NodeList"),
        }
    }
}

/// (resource, namespace, name)
type Key = (Resource, String, String);

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Watch events after `compacted`: (rv, resource, type, object).
    history: Vec<(u64, Resource, &'static str, Value)>,
    /// Events at or below this version are forgotten: older watches get 410.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    down: bool,
    /// Watch streams being served now.
    active_watches: usize,
    lists: BTreeMap<Resource, usize>,
    watches: BTreeMap<Resource, usize>,
}

/// A running fake API server; stops accepting on drop.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

fn lock(state: &(Mutex<State>, Condvar)) -> MutexGuard<'_, State> {
    state
        .0
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake API");
        let addr = listener.local_addr().expect("fake API address");
        let state = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let state = accept_state.clone();
                let stop = accept_stop.clone();
                std::thread::spawn(move || serve(stream, &state, &stop));
            }
        });
        Self { addr, state, stop }
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\n\
             users:\n- name: lb\n  user: {{token: fake}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: lb}}\n\
             current-context: fake\n",
            self.addr
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    fn change(&self, object: Value, deleted: bool) {
        let kind = object["kind"].as_str().unwrap_or_default();
        let resource =
            Resource::of_kind(kind).unwrap_or_else(|| panic!("fake API: unknown kind {kind}"));
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(match resource {
                Resource::Nodes => "",
                _ => "default",
            })
            .to_owned();
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        let key = (resource, namespace.clone(), name);
        let mut state = lock(&self.state);
        state.rv += 1;
        let rv = state.rv;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if resource != Resource::Nodes {
            object["metadata"]["namespace"] = json!(namespace);
        }
        let event = if deleted {
            let last = state
                .objects
                .remove(&key)
                .unwrap_or_else(|| panic!("fake API: no {key:?} to delete"));
            let mut last = last;
            last["metadata"]["resourceVersion"] = json!(rv.to_string());
            ("DELETED", last)
        } else if state.objects.insert(key, object.clone()).is_some() {
            ("MODIFIED", object)
        } else {
            ("ADDED", object)
        };
        state.history.push((rv, resource, event.0, event.1));
        drop(state);
        self.state.1.notify_all();
    }

    /// Creates or replaces an object (Service, EndpointSlice or Node, as JSON).
    pub fn apply(&self, object: Value) {
        self.change(object, false);
    }

    /// Deletes an object; `object` needs kind, metadata.name (and namespace).
    pub fn delete(&self, object: Value) {
        self.change(object, true);
    }

    /// Forgets the watch history: a watch from an older version gets 410 Gone and the client
    /// must list again.
    pub fn compact(&self) {
        let mut state = lock(&self.state);
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Ends every open watch stream (the client resumes from its last version).
    pub fn drop_watches(&self) {
        lock(&self.state).generation += 1;
        self.state.1.notify_all();
    }

    /// Takes the server down (every request fails with 503, open watches end: this returns
    /// once they have) or back up.
    pub fn set_down(&self, down: bool) {
        let mut state = lock(&self.state);
        state.down = down;
        state.generation += 1;
        self.state.1.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while down && state.active_watches > 0 && Instant::now() < deadline {
            state = self
                .state
                .1
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }

    /// How many list and watch requests each resource got.
    pub fn requests(&self, resource: Resource) -> (usize, usize) {
        let state = lock(&self.state);
        (
            state.lists.get(&resource).copied().unwrap_or(0),
            state.watches.get(&resource).copied().unwrap_or(0),
        )
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set_down(true);
        // Wake the accept loop so it sees the stop flag.
        let _woken = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

/// A parsed request: path and query parameters.
struct Request {
    path: String,
    query: BTreeMap<String, String>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                if let Ok(b) = u8::from_str_radix(hex, 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let target = line.split_whitespace().nth(1)?.to_owned();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        path: path.to_owned(),
        query,
    })
}

/// Whether `object` matches a label selector of `key`, `!key`, `key=value` or `key!=value`
/// terms, and a field selector of `metadata.name=...` terms.
fn matches(object: &Value, labels: Option<&String>, fields: Option<&String>) -> bool {
    let label = |k: &str| object["metadata"]["labels"][k].as_str().map(str::to_owned);
    let labels_ok = labels.is_none_or(|sel| {
        sel.split(',').filter(|t| !t.is_empty()).all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k).as_deref() != Some(v)
            } else if let Some((k, v)) = term.split_once('=') {
                label(k.trim_end_matches('=')).as_deref() == Some(v)
            } else if let Some(k) = term.strip_prefix('!') {
                label(k).is_none()
            } else {
                label(term).is_some()
            }
        })
    });
    let fields_ok = fields.is_none_or(|sel| {
        sel.split(',')
            .filter(|t| !t.is_empty())
            .all(|term| match term.split_once('=') {
                Some(("metadata.name", v)) => {
                    object["metadata"]["name"].as_str() == Some(v.trim_start_matches('='))
                }
                _ => true,
            })
    });
    labels_ok && fields_ok
}

fn respond(stream: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let _gone = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn serve(stream: TcpStream, state: &Arc<(Mutex<State>, Condvar)>, stop: &AtomicBool) {
    let Ok(read) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read);
    let mut stream = stream;
    let Some(request) = read_request(&mut reader) else {
        return;
    };
    if stop.load(Ordering::Relaxed) || lock(state).down {
        respond(
            &mut stream,
            "503 Service Unavailable",
            &status(503, "ServiceUnavailable", "the fake API is down"),
        );
        return;
    }
    if request.path == "/version" {
        let info = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-lb-fake", "gitCommit": "",
                          "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24",
                          "compiler": "gc", "platform": "linux/amd64"});
        respond(&mut stream, "200 OK", &info);
        return;
    }
    let Some(resource) = Resource::of_path(&request.path) else {
        respond(
            &mut stream,
            "404 Not Found",
            &status(404, "NotFound", &format!("no route {}", request.path)),
        );
        return;
    };
    let labels = request.query.get("labelSelector");
    let fields = request.query.get("fieldSelector");
    if request
        .query
        .get("watch")
        .is_some_and(|w| w == "true" || w == "1")
    {
        let from: u64 = request
            .query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = request
            .query
            .get("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290);
        let bookmarks = request
            .query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true");
        let request = WatchRequest {
            resource,
            from,
            labels,
            fields,
            timeout: Duration::from_secs(timeout),
            bookmarks,
        };
        watch(&mut stream, state, &request);
        return;
    }
    let mut guard = lock(state);
    *guard.lists.entry(resource).or_default() += 1;
    let items: Vec<Value> = guard
        .objects
        .iter()
        .filter(|((r, _, _), o)| *r == resource && matches(o, labels, fields))
        .map(|(_, o)| o.clone())
        .collect();
    let (api_version, kind) = resource.list_kind();
    let body = json!({"apiVersion": api_version, "kind": kind,
                      "metadata": {"resourceVersion": guard.rv.to_string()}, "items": items});
    drop(guard);
    respond(&mut stream, "200 OK", &body);
}

/// What a watch request asks for.
struct WatchRequest<'a> {
    resource: Resource,
    /// Events after this resourceVersion.
    from: u64,
    labels: Option<&'a String>,
    fields: Option<&'a String>,
    timeout: Duration,
    bookmarks: bool,
}

fn chunk(stream: &mut TcpStream, event: &Value) -> bool {
    let line = format!("{event}\n");
    write!(stream, "{:x}\r\n{line}\r\n", line.len())
        .and_then(|()| stream.flush())
        .is_ok()
}

fn watch(stream: &mut TcpStream, state: &Arc<(Mutex<State>, Condvar)>, request: &WatchRequest<'_>) {
    if write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return;
    }
    let mut guard = lock(state);
    *guard.watches.entry(request.resource).or_default() += 1;
    if guard.down {
        // Went down while this request was read: it never streams.
        drop(guard);
        let _ended = write!(stream, "0\r\n\r\n");
        return;
    }
    guard.active_watches += 1;
    drop(guard);
    stream_events(stream, state, request);
    lock(state).active_watches -= 1;
    state.1.notify_all();
}

/// The body of a watch: events after `from`, bookmarks, until the timeout, a drop or an
/// outage.
fn stream_events(
    stream: &mut TcpStream,
    state: &Arc<(Mutex<State>, Condvar)>,
    request: &WatchRequest<'_>,
) {
    let WatchRequest {
        resource,
        from,
        labels,
        fields,
        timeout,
        bookmarks,
    } = *request;
    let started = Instant::now();
    let mut guard = lock(state);
    let generation = guard.generation;
    if from < guard.compacted {
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({})", guard.compacted),
        );
        drop(guard);
        let _ended = chunk(stream, &json!({"type": "ERROR", "object": gone}));
        let _ended = write!(stream, "0\r\n\r\n");
        return;
    }
    let mut sent = from;
    let mut last_bookmark = Instant::now();
    loop {
        let pending: Vec<(u64, Value)> = guard
            .history
            .iter()
            .filter(|(rv, r, _, o)| *rv > sent && *r == resource && matches(o, labels, fields))
            .map(|(rv, _, t, o)| (*rv, json!({"type": t, "object": o})))
            .collect();
        let current = guard.rv;
        let done = guard.generation != generation || guard.down || started.elapsed() >= timeout;
        drop(guard);
        for (rv, event) in pending {
            if !chunk(stream, &event) {
                return;
            }
            sent = rv;
        }
        if done {
            let _ended = write!(stream, "0\r\n\r\n");
            return;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) && current > sent {
            let (api_version, kind) = resource.list_kind();
            let kind = kind.trim_end_matches("List");
            let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                                  "metadata": {"resourceVersion": current.to_string()}}});
            if !chunk(stream, &bookmark) {
                return;
            }
            sent = current;
            last_bookmark = Instant::now();
        }
        guard = lock(state);
        let (next, _) = state
            .1
            .wait_timeout(guard, Duration::from_millis(200))
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard = next;
    }
}
