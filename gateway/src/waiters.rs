//! Requests waiting for a run to end (`?wait=`), woken by `runs.events`
//! messages — never by polling the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use wire::events::RunEvent;

/// The latest event of one run, and how many requests wait for it.
type Slot = (watch::Sender<Option<RunEvent>>, usize);

#[derive(Default)]
pub struct Waiters {
    runs: Mutex<HashMap<String, Slot>>,
}

/// One waiting request; unregisters itself when dropped.
pub struct Waiter {
    run_id: String,
    waiters: Arc<Waiters>,
    pub events: watch::Receiver<Option<RunEvent>>,
}

impl Waiters {
    /// Registers interest in `run_id`. Subscribe before the run can emit
    /// anything (before publishing it), so no event is missed.
    pub fn subscribe(self: &Arc<Self>, run_id: &str) -> Waiter {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        let entry = runs
            .entry(run_id.to_owned())
            .or_insert_with(|| (watch::channel(None).0, 0));
        entry.1 += 1;
        Waiter {
            run_id: run_id.to_owned(),
            waiters: self.clone(),
            events: entry.0.subscribe(),
        }
    }

    /// Passes an event to the requests waiting for its run, if any.
    pub fn notify(&self, event: &RunEvent) {
        let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((sender, _)) = runs.get(event.run_id.as_str()) {
            let newer = sender
                .borrow()
                .as_ref()
                .is_none_or(|seen| event.status.rank() >= seen.status.rank());
            if newer {
                sender.send_replace(Some(event.clone()));
            }
        }
    }

    /// How many runs have waiting requests (for tests and metrics).
    pub fn len(&self) -> usize {
        self.runs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut runs = self.waiters.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = runs.get_mut(&self.run_id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                runs.remove(&self.run_id);
            }
        }
    }
}
