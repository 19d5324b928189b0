//! Connection lanes: single-worker runtimes, each on its own thread, that NBD connections are
//! spread over (the lane with the fewest open connections takes the next one).
//!
//! A connection's tasks (its reader, its writer) wake each other all the time. On one
//! multi-thread runtime every such wake-up, and every socket event the I/O driver delivers,
//! may also wake another worker to look for work, which then finds none and sleeps again: on
//! a 2-core machine about one futile switch per request on each worker. In a lane a
//! connection's tasks stay on the lane's one worker, and the lanes still spread the
//! connections over the CPUs. A lane is a multi-thread runtime with one worker (not a
//! current-thread one) so that a connection may still block its thread where it must
//! (`block_in_place`: the worker moves to another thread meanwhile).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::runtime::{Handle, Runtime};
use tokio::task::{AbortHandle, JoinSet};

/// The lanes' runtimes. Dropped outside of any runtime (it waits for their threads).
pub struct Lanes {
    _runtimes: Vec<Runtime>,
    spawner: LaneSpawner,
}

/// Where connections are spawned: the lanes, or (without any) the current runtime.
#[derive(Debug, Clone, Default)]
pub struct LaneSpawner {
    lanes: Vec<(Handle, Arc<AtomicUsize>)>,
}

impl Lanes {
    /// Starts `n` lanes (none: connections run on the caller's runtime).
    pub fn start(n: usize) -> std::io::Result<Lanes> {
        let mut runtimes = Vec::with_capacity(n);
        let mut lanes = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("nbd-lane-{i}"))
                .enable_all()
                .build()?;
            lanes.push((rt.handle().clone(), Arc::new(AtomicUsize::new(0))));
            runtimes.push(rt);
        }
        Ok(Lanes {
            _runtimes: runtimes,
            spawner: LaneSpawner { lanes },
        })
    }

    /// What the server spawns its connections with.
    pub fn spawner(&self) -> LaneSpawner {
        self.spawner.clone()
    }
}

impl LaneSpawner {
    /// Spawns `conn` into `set`, on the lane with the fewest open connections.
    pub(super) fn spawn<F>(&self, set: &mut JoinSet<()>, conn: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some((handle, open)) = self
            .lanes
            .iter()
            .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
        else {
            return set.spawn(conn);
        };
        let open = Open::count(open.clone());
        set.spawn_on(
            async move {
                let _open = open;
                conn.await
            },
            handle,
        )
    }
}

/// One open connection of a lane, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(n: Arc<AtomicUsize>) -> Open {
        n.fetch_add(1, Ordering::Relaxed);
        Open(n)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// The name of the thread a connection spawned now runs on, and a sender that ends it.
    fn connect(
        rt: &Runtime,
        spawner: &LaneSpawner,
        set: &mut JoinSet<()>,
    ) -> (String, oneshot::Sender<()>) {
        let (name_tx, name_rx) = oneshot::channel();
        let (end_tx, end_rx) = oneshot::channel::<()>();
        rt.block_on(async {
            spawner.spawn(set, async move {
                let name = std::thread::current()
                    .name()
                    .unwrap_or_default()
                    .to_string();
                let _ = name_tx.send(name);
                let _ = end_rx.await;
            })
        });
        (rt.block_on(name_rx).unwrap(), end_tx)
    }

    /// Connections go to the lane with the fewest open, and run on its thread; without lanes
    /// they run on the caller's runtime.
    #[test]
    fn connections_spread_over_the_lanes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lanes = Lanes::start(2).unwrap();
        let spawner = lanes.spawner();
        let mut set = JoinSet::new();
        let (a, end_a) = connect(&rt, &spawner, &mut set);
        let (b, _keep_b) = connect(&rt, &spawner, &mut set);
        assert!(
            a.starts_with("nbd-lane-") && b.starts_with("nbd-lane-"),
            "{a} {b}"
        );
        assert_ne!(a, b, "two connections, two lanes");
        end_a.send(()).unwrap();
        rt.block_on(set.join_next()).unwrap().unwrap();
        let (c, _keep_c) = connect(&rt, &spawner, &mut set);
        assert_eq!(c, a, "the next connection goes to the lane left empty");

        let mut own = JoinSet::new();
        let here = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        let (d, _keep_d) = connect(&rt, &LaneSpawner::default(), &mut own);
        assert_eq!(d, here, "no lanes: the caller's runtime");
        rt.block_on(async { set.shutdown().await });
        drop(rt);
    }
}
