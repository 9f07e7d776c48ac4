//! A task run every so often on a thread of its own until dropped (the query API's refresh, the
//! spool's forwarding to Kafka): the drop stops the wait at once and joins the thread.

use std::sync::mpsc;
use std::time::Duration;

/// Runs a task every `every` until dropped.
pub struct Periodic {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Periodic {
    /// Starts a thread named `name` that runs `task` every `every` (first after one period).
    pub fn start(
        name: &str,
        every: Duration,
        mut task: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    task();
                }
            })?;
        Ok(Periodic {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
