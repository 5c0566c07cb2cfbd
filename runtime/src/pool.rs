//! quill's kernel threads: helpers that spin between products instead of sleeping.
//!
//! A decode step calls quill's int8 kernel about 200 times, each product 10–100 µs of work.
//! Handing half of such a product to a sleeping rayon worker (tract's pool) costs a futex
//! wake-up and a steal, tens of µs: with tract's pool two threads decoded slower than one
//! (49 against 60 tok/s on the int8 teacher). The helpers here watch an atomic counter in a
//! spin loop, so a job reaches them in well under a microsecond, and only sleep after
//! [`SPIN`] without work (between requests), so an idle server does not burn a core.
//!
//! **Invariant:** a job's closure only runs while [`Pool::run`] is on the stack: `run` returns
//! after every helper has finished its part, which is what makes lending it a borrowed closure
//! sound.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper keeps spinning after its last job before it sleeps. A decode step's gaps
/// between products (tract's own ops, sampling, printing) are far shorter.
pub const SPIN: Duration = Duration::from_millis(5);

/// A job: part `i` of `parts`, run by the calling thread (part 0) and each helper.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job (and once at shutdown); helpers wait for it to change.
    epoch: AtomicU64,
    /// The current job, lifetime erased: valid while `pending > 0` (see the module invariant).
    job: UnsafeCell<Option<Job<'static>>>,
    /// Helpers that have not finished the current job.
    pending: AtomicUsize,
    /// Per helper: it is parked, or about to park (Dekker-style with `epoch`, both SeqCst).
    sleeping: Vec<AtomicBool>,
    /// A helper's part panicked; the caller re-raises it.
    panicked: AtomicBool,
    shutdown: AtomicBool,
}

// SAFETY: `job` is written only by the thread holding `Pool::busy` while no helper reads it
// (pending == 0), and read by helpers only after the Release/Acquire pair on `epoch`.
unsafe impl Sync for Shared {}
/// A raw pointer to one output buffer, shared by the parts of one [`Pool::run`] (or of one
/// scoped thread set), each writing its own disjoint range of it.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand disjoint ranges of one buffer to the parts of one job, which all
// end before the buffer's borrow does.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// `threads − 1` spinning helpers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One job at a time; a second caller runs its job alone instead of waiting.
    busy: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads())
    }
}

impl Pool {
    /// A pool of `threads` (the caller counts as one; `threads ≤ 1` starts no helper).
    pub fn new(threads: usize) -> Pool {
        let helpers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            pending: AtomicUsize::new(0),
            sleeping: (0..helpers).map(|_| AtomicBool::new(false)).collect(),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
        });
        let workers = (0..helpers)
            .map(|h| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("quill-kernel-{}", h + 1))
                    .spawn(move || helper(&shared, h))
                    .expect("starting a kernel thread")
            })
            .collect();
        Pool {
            shared,
            workers,
            busy: Mutex::new(()),
        }
    }

    /// Threads a job is split over.
    pub fn threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Runs `job(0)` on this thread and `job(1) .. job(threads − 1)` on the helpers, and
    /// returns when all have finished. If another thread is using the pool, runs every part
    /// here, one after the other.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let parts = self.threads();
        let Ok(_busy) = (if parts > 1 {
            self.busy.try_lock()
        } else {
            Err(std::sync::TryLockError::WouldBlock)
        }) else {
            (0..parts).for_each(job);
            return;
        };
        let s = &*self.shared;
        // SAFETY: we hold `busy` and the previous job has fully finished (pending == 0), so
        // no helper reads `job`; it is cleared again before this function returns, so the
        // erased lifetime never outlives the borrow.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<Job<'_>, Job<'static>>(job));
        }
        s.pending.store(parts - 1, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for (h, sleeping) in s.sleeping.iter().enumerate() {
            if sleeping.load(Ordering::SeqCst) {
                self.workers[h].thread().unpark();
            }
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins = spins.saturating_add(1);
            pause(spins);
        }
        // SAFETY: every helper is done with the job (pending == 0 after their Release).
        unsafe { *s.job.get() = None };
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a quill kernel thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for w in &self.workers {
            w.thread().unpark();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One round of waiting: a CPU pause for the first [`PURE_SPINS`] rounds (a job or a helper's
/// part usually arrives within microseconds), then a yield to the scheduler, so that a waiter
/// on a machine with more runnable threads than cores does not hold a core the awaited
/// thread needs.
fn pause(spins: u32) {
    if spins < PURE_SPINS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Rounds of pure spinning before [`pause`] yields (about 10–50 µs).
const PURE_SPINS: u32 = 2048;

/// Helper `h` (part `h + 1` of every job) until the pool is dropped.
fn helper(s: &Shared, h: usize) {
    let mut seen = 0;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = s.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.saturating_add(1);
            if spins.is_multiple_of(64) && idle_since.elapsed() > SPIN {
                s.sleeping[h].store(true, Ordering::SeqCst);
                if s.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                s.sleeping[h].store(false, Ordering::SeqCst);
                idle_since = Instant::now();
                spins = 0;
            }
            pause(spins);
        }
        if s.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: the epoch changed with a job published before it (Release/Acquire), and the
        // caller waits for our `pending` decrement before clearing it.
        let job = unsafe { *s.job.get() };
        if let Some(job) = job
            && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(h + 1))).is_err()
        {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job() {
        for threads in 1..=3 {
            let pool = Pool::new(threads);
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..2_000 {
                pool.run(&|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 2_000, "{threads} threads");
            }
        }
    }

    #[test]
    fn sleeping_helpers_wake_for_the_next_job() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        pool.run(&|i| {
            sum.fetch_add(i + 1, Ordering::Relaxed);
        });
        // The helper stops spinning after SPIN idle and parks (given time to run on a busy
        // machine).
        let t0 = Instant::now();
        while !pool.shared.sleeping[0].load(Ordering::SeqCst) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the helper never slept"
            );
            std::thread::sleep(SPIN);
        }
        pool.run(&|i| {
            sum.fetch_add(i + 1, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_panicking_part_reaches_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i| assert_ne!(i, 1, "part 1 fails"));
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(&|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn concurrent_callers_each_get_every_part() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..3)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        pool.run(&|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 500 * 2);
    }
}
