//! The thread pool every kernel runs in. Its size comes from `set_num_threads`, else the
//! `INDUCT_FAST_NUM_THREADS` variable, else the number of cores. Results never depend on it:
//! kernels split work into fixed blocks and combine them in a fixed order.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::{Error, Result};

struct Pool {
    /// The process that built the pool: a forked child inherits the pool's memory but not its
    /// threads, so it must build its own (and leak the dead one rather than join it).
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn default_threads() -> usize {
    std::env::var("INDUCT_FAST_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(threads: usize) -> Result<Pool> {
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("induct-fast-{i}"))
        .build()
        .map_err(|e| Error::invalid("n", "a number of threads the system can start", format!("{threads} ({e})")))?;
    Ok(Pool { pid: std::process::id(), threads, pool: Arc::new(pool) })
}

fn current() -> Arc<ThreadPool> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_ref() {
        Some(p) if p.pid == std::process::id() => p.pool.clone(),
        stale => {
            let threads = stale.map_or_else(default_threads, |p| p.threads);
            if let Some(old) = guard.take() {
                std::mem::forget(old); // a forked child's copy: its threads do not exist here
            }
            // A default the system refuses (thread limits) falls back to one thread.
            let fresh = build(threads).or_else(|_| build(1)).expect("starting one worker thread");
            let pool = fresh.pool.clone();
            *guard = Some(fresh);
            pool
        }
    }
}

/// Runs `work` inside the pool, so its rayon iterators use the configured threads.
pub fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    current().install(work)
}

/// Sets the number of threads used by every later call (at least 1).
pub fn set_num_threads(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::invalid("n", "a number of threads >= 1", n));
    }
    let pool = build(n)?;
    *POOL.lock().unwrap_or_else(|e| e.into_inner()) = Some(pool);
    Ok(())
}

pub fn get_num_threads() -> usize {
    current().current_num_threads()
}

/// Serialises the unit tests that resize the global pool (cargo runs tests in parallel).
#[cfg(test)]
pub static RESIZE_LOCK: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_get_threads() {
        let _guard = RESIZE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        assert!(set_num_threads(0).is_err());
        set_num_threads(2).unwrap();
        assert_eq!(get_num_threads(), 2);
        assert_eq!(install(rayon::current_num_threads), 2);
    }
}
