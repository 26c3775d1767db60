//! Writing many elements of one map: `BPF_MAP_UPDATE_BATCH`/`BPF_MAP_DELETE_BATCH` in chunks,
//! large runs split over threads, single writes where the kernel refuses batches, and the
//! first failure's index, so the caller knows what went through.
//!
//! Any map the agent fills in bulk goes through here (frontends, slots, members, names, and
//! maps added later): the caller says how to write a range of its elements as one batch and
//! one element alone, and gets back where the run stopped.
//!
//! Why threads: on a first sync into empty maps nearly all the time is the kernel inserting
//! elements (hashing, the bucket lock, allocating each element of a `BPF_F_NO_PREALLOC` map;
//! about 1-3 µs an element on this machine). Hash maps lock per bucket, so two threads
//! inserting into one map scale with the cores. Elements of one run are independent (the
//! planner orders runs, never elements within one: see `plan::by_phase`), so splitting a run
//! keeps the make-before-break order between runs.

use std::{io, ops::Range, os::fd::BorrowedFd, time::Duration};

use super::sys::{self, BatchError};

/// Elements per batched syscall: big enough to amortise the syscall, small enough to keep
/// each one short (the kernel holds no lock across elements, but a long call delays signals).
pub const CHUNK: usize = 4096;

/// Runs shorter than this are written by the calling thread alone.
pub const PARALLEL_MIN: usize = 4 * CHUNK;

/// Retries of a chunk that failed with ENOMEM. A `BPF_F_NO_PREALLOC` map allocates each
/// element from a per-CPU cache that the kernel refills asynchronously (irq_work); a burst of
/// millions of inserts can find it empty for a moment.
const NOMEM_RETRIES: u32 = 6;

/// How to write elements of one map, by index into the caller's list.
pub trait Target: Sync {
    /// Writes `range` in one batched syscall.
    fn batch(&self, range: Range<usize>) -> Result<(), BatchError>;
    /// Writes element `index` alone.
    fn single(&self, index: usize) -> io::Result<()>;
    /// Whether the writes are deletions (a key already gone counts as deleted).
    fn deleting(&self) -> bool;
}

/// Updates of one map: `keys[i] -> values[i]`.
pub struct Updates<'a, K, V> {
    pub map: BorrowedFd<'a>,
    pub keys: &'a [K],
    pub values: &'a [V],
}

impl<K: aya::Pod + Sync, V: aya::Pod + Sync> Target for Updates<'_, K, V> {
    fn batch(&self, range: Range<usize>) -> Result<(), BatchError> {
        sys::map_update_batch(self.map, &self.keys[range.clone()], &self.values[range])
    }
    fn single(&self, index: usize) -> io::Result<()> {
        sys::map_update_elem(self.map, &self.keys[index], &self.values[index])
    }
    fn deleting(&self) -> bool {
        false
    }
}

/// Deletions of `keys` from one map.
pub struct Deletes<'a, K> {
    pub map: BorrowedFd<'a>,
    pub keys: &'a [K],
}

impl<K: aya::Pod + Sync> Target for Deletes<'_, K> {
    fn batch(&self, range: Range<usize>) -> Result<(), BatchError> {
        sys::map_delete_batch(self.map, &self.keys[range])
    }
    fn single(&self, index: usize) -> io::Result<()> {
        sys::map_delete_elem(self.map, &self.keys[index])
    }
    fn deleting(&self) -> bool {
        true
    }
}

/// Where a run stopped: every element before `index` was written; `index` was not.
/// Elements after it may or may not have been (other threads went on): writing them again
/// is harmless, as an update or delete of the same key is idempotent.
#[derive(Debug)]
pub struct Stopped {
    pub index: usize,
    pub error: io::Error,
}

/// Whether `error` says the kernel does not do batch operations on this map (kernels before
/// 5.6, map types without them): `EINVAL`, `ENOTSUPP` (524, kernel-internal) or `EOPNOTSUPP`.
fn batch_refused(error: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

fn is_gone(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ENOENT)
}

/// Writes elements `range` in chunks of `chunk`; falls back to single writes for the rest of
/// the range when the first batch is refused outright.
pub fn write_range(target: &dyn Target, range: Range<usize>, chunk: usize) -> Result<(), Stopped> {
    let chunk = chunk.max(1);
    let mut next = range.start;
    let mut batched_once = false;
    let mut nomem = 0;
    while next < range.end {
        let end = range.end.min(next.saturating_add(chunk));
        match target.batch(next..end) {
            Ok(()) => {
                batched_once = true;
                nomem = 0;
                next = end;
            }
            Err(e) if e.done == 0 && !batched_once && batch_refused(&e.error) => {
                return write_singles(target, next..range.end);
            }
            Err(e) => {
                let at = next + e.done.min(end - next);
                if e.done > 0 {
                    batched_once = true;
                }
                if target.deleting() && is_gone(&e.error) {
                    next = at + 1;
                } else if e.error.raw_os_error() == Some(libc::ENOMEM) && nomem < NOMEM_RETRIES {
                    std::thread::sleep(Duration::from_millis(1 << nomem));
                    nomem += 1;
                    next = at;
                } else {
                    return Err(Stopped {
                        index: at,
                        error: e.error,
                    });
                }
            }
        }
    }
    Ok(())
}

fn write_singles(target: &dyn Target, range: Range<usize>) -> Result<(), Stopped> {
    for index in range {
        match target.single(index) {
            Ok(()) => {}
            Err(e) if target.deleting() && is_gone(&e) => {}
            Err(error) => return Err(Stopped { index, error }),
        }
    }
    Ok(())
}

/// `0..len` cut into at most `parts` contiguous ranges of nearly equal length.
pub fn split(len: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, len.max(1));
    let base = len / parts;
    let extra = len % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let end = start + base + usize::from(i < extra);
            let range = start..end;
            start = end;
            range
        })
        .collect()
}

/// The threads a run of `len` elements is written with: one for short runs, else one per
/// core, at most `max`.
pub fn threads_for(len: usize, max: usize) -> usize {
    if len < PARALLEL_MIN {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(max)
        .max(1)
}

/// Writes elements `0..len` of `target`, split over `threads` threads (in chunks of
/// `chunk`). On failure: the lowest index that was not written (everything before it was).
pub fn write(target: &dyn Target, len: usize, chunk: usize, threads: usize) -> Result<(), Stopped> {
    let parts = split(len, threads);
    if parts.len() <= 1 {
        return write_range(target, 0..len, chunk);
    }
    let results: Vec<Result<(), Stopped>> = std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|range| scope.spawn(move || write_range(target, range, chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Stopped {
                        index: 0,
                        error: io::Error::other("a map writer thread panicked"),
                    })
                })
            })
            .collect()
    });
    // Ranges are in order: the first failing one holds the lowest unwritten index.
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use rstest::rstest;

    use super::*;

    /// A map in memory that records what was written and fails as told.
    #[derive(Default)]
    struct Fake {
        deleting: bool,
        /// Refuse every batch with this errno (before doing anything).
        refuse_batches: Option<i32>,
        /// Element index -> errno it fails with (once, if `once`).
        fail_at: Vec<(usize, i32)>,
        once: bool,
        written: Mutex<Vec<usize>>,
        batches: Mutex<usize>,
        singles: Mutex<usize>,
    }

    impl Fake {
        fn failure(&self, index: usize) -> Option<i32> {
            let hit = self.fail_at.iter().find(|(i, _)| *i == index).map(|f| f.1);
            if hit.is_some() && self.once && self.written.lock().unwrap().contains(&usize::MAX) {
                return None;
            }
            hit
        }
        fn note_failure(&self) {
            if self.once {
                self.written.lock().unwrap().push(usize::MAX);
            }
        }
        fn written(&self) -> Vec<usize> {
            let mut w: Vec<usize> = self
                .written
                .lock()
                .unwrap()
                .iter()
                .copied()
                .filter(|&i| i != usize::MAX)
                .collect();
            w.sort_unstable();
            w
        }
    }

    impl Target for Fake {
        fn batch(&self, range: Range<usize>) -> Result<(), BatchError> {
            *self.batches.lock().unwrap() += 1;
            if let Some(errno) = self.refuse_batches {
                return Err(BatchError {
                    done: 0,
                    error: io::Error::from_raw_os_error(errno),
                });
            }
            let start = range.start;
            for i in range {
                if let Some(errno) = self.failure(i) {
                    self.note_failure();
                    return Err(BatchError {
                        done: i - start,
                        error: io::Error::from_raw_os_error(errno),
                    });
                }
                self.written.lock().unwrap().push(i);
            }
            Ok(())
        }
        fn single(&self, index: usize) -> io::Result<()> {
            *self.singles.lock().unwrap() += 1;
            if let Some(errno) = self.failure(index) {
                self.note_failure();
                return Err(io::Error::from_raw_os_error(errno));
            }
            self.written.lock().unwrap().push(index);
            Ok(())
        }
        fn deleting(&self) -> bool {
            self.deleting
        }
    }

    #[rstest]
    #[case::empty(0, 2, &[(0, 0)])]
    #[case::fewer_elements_than_parts(1, 4, &[(0, 1)])]
    #[case::even(8, 2, &[(0, 4), (4, 8)])]
    #[case::uneven(7, 3, &[(0, 3), (3, 5), (5, 7)])]
    #[case::zero_parts_is_one(5, 0, &[(0, 5)])]
    fn split_covers_everything_in_order(
        #[case] len: usize,
        #[case] parts: usize,
        #[case] want: &[(usize, usize)],
    ) {
        let got: Vec<(usize, usize)> = split(len, parts)
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect();
        assert_eq!(got, want);
    }

    #[rstest]
    #[case::one_thread(1)]
    #[case::two_threads(2)]
    #[case::four_threads(4)]
    fn everything_is_written_in_chunks(#[case] threads: usize) {
        let fake = Fake::default();
        write(&fake, 10_000, 1000, threads).unwrap();
        assert_eq!(fake.written(), (0..10_000).collect::<Vec<_>>());
        let want: usize = split(10_000, threads)
            .iter()
            .map(|r| r.len().div_ceil(1000))
            .sum();
        assert_eq!(*fake.batches.lock().unwrap(), want);
        assert_eq!(*fake.singles.lock().unwrap(), 0);
    }

    #[rstest]
    #[case::einval(libc::EINVAL)]
    #[case::enotsupp(524)]
    #[case::eopnotsupp(libc::EOPNOTSUPP)]
    fn refused_batches_fall_back_to_single_writes(#[case] errno: i32) {
        let fake = Fake {
            refuse_batches: Some(errno),
            ..Fake::default()
        };
        write(&fake, 100, 16, 1).unwrap();
        assert_eq!(fake.written(), (0..100).collect::<Vec<_>>());
        assert_eq!(*fake.batches.lock().unwrap(), 1, "one refusal is enough");
        assert_eq!(*fake.singles.lock().unwrap(), 100);
    }

    #[test]
    fn a_failure_names_the_first_unwritten_element() {
        let fake = Fake {
            fail_at: vec![(37, libc::E2BIG)],
            ..Fake::default()
        };
        let stopped = write(&fake, 100, 16, 1).unwrap_err();
        assert_eq!(stopped.index, 37);
        assert_eq!(stopped.error.raw_os_error(), Some(libc::E2BIG));
        assert_eq!(fake.written(), (0..37).collect::<Vec<_>>());
    }

    #[test]
    fn with_threads_the_lowest_failure_wins_and_the_prefix_is_written() {
        // Failures in both halves: the caller learns the lower one, and everything before it
        // went through.
        let fake = Fake {
            fail_at: vec![(80_000, libc::EFAULT), (30_000, libc::EFAULT)],
            ..Fake::default()
        };
        let stopped = write(&fake, 100_000, CHUNK, 2).unwrap_err();
        assert_eq!(stopped.index, 30_000);
        let written = fake.written();
        assert!(written.iter().take(30_000).copied().eq(0..30_000));
        assert!(!written.contains(&30_000));
    }

    #[test]
    fn a_batch_that_fails_midway_is_not_taken_for_a_refusal() {
        // EINVAL after some elements went through is an element's error, not "no batches".
        let fake = Fake {
            fail_at: vec![(20, libc::EINVAL)],
            ..Fake::default()
        };
        let stopped = write(&fake, 100, 16, 1).unwrap_err();
        assert_eq!(stopped.index, 20);
        assert_eq!(*fake.singles.lock().unwrap(), 0);
    }

    #[test]
    fn deleting_what_is_gone_goes_on() {
        let fake = Fake {
            deleting: true,
            fail_at: vec![(3, libc::ENOENT), (50, libc::ENOENT)],
            ..Fake::default()
        };
        write(&fake, 64, 16, 1).unwrap();
        let want: Vec<usize> = (0..64).filter(|i| *i != 3 && *i != 50).collect();
        assert_eq!(fake.written(), want);
    }

    #[test]
    fn enoent_on_an_update_is_an_error() {
        let fake = Fake {
            fail_at: vec![(3, libc::ENOENT)],
            ..Fake::default()
        };
        assert_eq!(write(&fake, 64, 16, 1).unwrap_err().index, 3);
    }

    #[test]
    fn enomem_is_retried_from_where_it_stopped() {
        let fake = Fake {
            fail_at: vec![(10, libc::ENOMEM)],
            once: true,
            ..Fake::default()
        };
        write(&fake, 64, 16, 1).unwrap();
        assert_eq!(fake.written(), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn enomem_that_lasts_is_an_error() {
        let fake = Fake {
            fail_at: vec![(10, libc::ENOMEM)],
            ..Fake::default()
        };
        let stopped = write(&fake, 64, 16, 1).unwrap_err();
        assert_eq!(stopped.index, 10);
        assert_eq!(stopped.error.raw_os_error(), Some(libc::ENOMEM));
    }

    /// A real `BPF_F_NO_PREALLOC` hash map of `capacity` u32 -> u64 (not pinned; gone with
    /// its descriptor). Needs CAP_BPF, as every test of the kernel paths.
    fn kernel_map(capacity: u32) -> aya::maps::HashMap<aya::maps::MapData, u32, u64> {
        let def = aya_obj::maps::bpf_map_def {
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH as u32,
            key_size: 4,
            value_size: 8,
            max_entries: capacity,
            map_flags: lb_common::maps::BPF_F_NO_PREALLOC,
            ..Default::default()
        };
        let obj = aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
            def,
            inner_def: None,
            section_index: 0,
            section_kind: aya_obj::EbpfSectionKind::Maps,
            symbol_index: None,
            data: Vec::new(),
        });
        let data = aya::maps::MapData::create(obj, "lb_batch_test", None)
            .expect("creating a BPF map (needs CAP_BPF)");
        aya::maps::HashMap::try_from(aya::maps::Map::from_map_data(data).unwrap()).unwrap()
    }

    #[test]
    fn kernel_map_filled_by_two_threads_then_deleted_around_holes() {
        use std::os::fd::AsFd as _;

        use aya::maps::IterableMap as _;
        let mut map = kernel_map(100_000);
        let keys: Vec<u32> = (0..60_000).collect();
        let values: Vec<u64> = keys.iter().map(|k| u64::from(*k) * 3).collect();
        let fd = map.map().fd().as_fd();
        let updates = Updates {
            map: fd,
            keys: &keys,
            values: &values,
        };
        write(&updates, keys.len(), CHUNK, 2).unwrap();
        assert_eq!(map.keys().count(), 60_000);
        assert_eq!(map.get(&59_999, 0).unwrap(), 179_997);
        // Delete every key, some of them already gone: not an error.
        for gone in [5u32, 4_096, 40_000] {
            map.remove(&gone).unwrap();
        }
        let fd = map.map().fd().as_fd();
        write(
            &Deletes {
                map: fd,
                keys: &keys,
            },
            keys.len(),
            CHUNK,
            2,
        )
        .unwrap();
        assert_eq!(map.keys().count(), 0);
    }

    #[test]
    fn kernel_map_full_stops_at_the_first_unwritten_key() {
        use std::os::fd::AsFd as _;

        use aya::maps::IterableMap as _;
        let map = kernel_map(20_000);
        let keys: Vec<u32> = (0..30_000).collect();
        let values = vec![7u64; keys.len()];
        let fd = map.map().fd().as_fd();
        let updates = Updates {
            map: fd,
            keys: &keys,
            values: &values,
        };
        let stopped = write(&updates, keys.len(), CHUNK, 2).unwrap_err();
        assert_eq!(stopped.error.raw_os_error(), Some(libc::E2BIG));
        // Two threads raced for the room: whoever lost stopped first, and every key before
        // the reported index is in.
        for key in &keys[..stopped.index] {
            assert_eq!(map.get(key, 0).unwrap(), 7, "key {key}");
        }
        assert!(map.get(&keys[stopped.index], 0).is_err());
        assert_eq!(map.keys().count(), 20_000);
        let err = super::super::maps::map_error("LB_SLOTS", 20_000, stopped.error);
        assert_eq!(err.to_string(), "map LB_SLOTS is full (capacity 20000)");
    }
}
