//! A cap on sessions served at once, resizable by a configuration reload
//! without losing count of the sessions that already hold a slot.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Limit {
    slots: Arc<Semaphore>,
    size: Mutex<usize>,
}

impl Limit {
    pub fn new(size: usize) -> Limit {
        Limit {
            slots: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
        }
    }

    pub fn size(&self) -> usize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot, held until the permit is dropped; `None` when all are taken.
    pub fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// Grows at once; shrinks by retiring free slots now and the rest as the
    /// sessions holding them end, so that sessions over the new limit are
    /// never cut off but no new one starts until the count is below it.
    pub fn resize(&self, new_size: usize) {
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if new_size > *size {
            self.slots.add_permits(new_size - *size);
        } else if new_size < *size {
            let shrink = *size - new_size;
            let owed = shrink - self.slots.forget_permits(shrink);
            if owed > 0 {
                // A waiter is served before any later try_acquire, so the
                // slots freed next are retired first.
                let slots = Arc::clone(&self.slots);
                let owed = u32::try_from(owed).unwrap_or(u32::MAX);
                tokio::spawn(async move {
                    if let Ok(retired) = slots.acquire_many_owned(owed).await {
                        retired.forget();
                    }
                });
            }
        }
        *size = new_size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn growing_frees_slots_at_once() {
        let limit = Limit::new(1);
        let _held = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        limit.resize(2);
        assert!(limit.try_acquire().is_some());
    }

    #[tokio::test]
    async fn shrinking_below_the_sessions_held_waits_for_them_to_end() {
        let limit = Limit::new(3);
        let first = limit.try_acquire().unwrap();
        let second = limit.try_acquire().unwrap();
        limit.resize(1);
        assert!(limit.try_acquire().is_none(), "two held, limit one");
        drop(first);
        tokio::task::yield_now().await;
        assert!(limit.try_acquire().is_none(), "one held, limit one");
        drop(second);
        tokio::task::yield_now().await;
        assert!(limit.try_acquire().is_some());
        assert_eq!(limit.size(), 1);
    }
}
