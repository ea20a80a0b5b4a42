//! Holding back one source's discovery while the pipeline follows as many of its files as it
//! will: the rest wait on disk, not in memory, and no other source waits with them.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Default)]
pub struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    /// Discovery of this source waits, from its next batch on, until [`Gate::open`].
    pub fn close(&self) {
        *self.closed.lock().expect("not poisoned") = true;
    }

    pub fn open(&self) {
        *self.closed.lock().expect("not poisoned") = false;
        self.opened.notify_all();
    }

    /// Blocks the calling (discovery) thread while the gate is closed.
    pub(super) fn wait_open(&self) {
        let closed = self.closed.lock().expect("not poisoned");
        let _open = self
            .opened
            .wait_while(closed, |closed| *closed)
            .expect("not poisoned");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_closed_gate_holds_its_thread_until_opened() {
        let gate = Arc::new(Gate::default());
        gate.close();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                gate.wait_open();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        gate.open();
        rx.recv_timeout(Duration::from_secs(5))
            .expect("let through");
        waiting.join().unwrap();
        // Open, it holds nobody.
        gate.wait_open();
    }
}
