//! Forwards the eBPF programs' aya-log records (rare datapath events: a conntrack insert that
//! failed, a FIB lookup that failed, a rewrite that failed after parsing; see
//! `lb-ebpf/src/nodeport/events.rs`) into the agent's logs. aya-log writes them to the `log`
//! crate, which the agent's tracing subscriber takes in (`logging::init`).

use aya::Ebpf;
use tokio::io::{Interest, unix::AsyncFd};

/// Starts reading the log records of the programs loaded in `ebpf` (its `AYA_LOGS` ring
/// buffer) on a task of its own. Without it the datapath works the same, so a failure is
/// logged and nothing more.
pub fn start(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF log records will not be forwarded");
            return;
        }
    };
    // SAFETY: the logger owns its ring buffer's descriptor, open and the same for as long as
    // the logger lives, and the AsyncFd owns the logger.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "eBPF log records will not be forwarded");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
