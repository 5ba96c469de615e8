//! Caps on what is served at once, resizable by a configuration reload
//! without losing count of what already holds a slot: sessions
//! ([`Limit`]), and connections still starting up, overall and per client
//! address ([`StartupLimits`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) struct Limit {
    slots: Arc<Semaphore>,
    size: Mutex<usize>,
}

impl Limit {
    pub(crate) fn new(size: usize) -> Limit {
        Limit {
            slots: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
        }
    }

    #[cfg(test)]
    pub(crate) fn size(&self) -> usize {
        *self.size.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot, held until the permit is dropped; `None` when all are taken.
    pub(crate) fn try_acquire(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    /// Grows at once; shrinks by retiring free slots now and the rest as the
    /// sessions holding them end, so that sessions over the new limit are
    /// never cut off but no new one starts until the count is below it.
    pub(crate) fn resize(&self, new_size: usize) {
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

/// Connections not yet authenticated: at most `max` at once, and at most
/// `max_per_address` of them from one client address, so that clients that
/// connect and then dawdle or say nothing hold a bounded share, and one
/// address cannot hold it all.
pub(crate) struct StartupLimits {
    state: Mutex<Startups>,
}

struct Startups {
    max: usize,
    max_per_address: usize,
    total: usize,
    /// Only addresses with a connection in startup, so at most `max` entries.
    by_address: HashMap<IpAddr, usize>,
}

/// Which startup limit turned a connection away, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartupLimitHit {
    /// `[listen] max_startups`.
    Overall(usize),
    /// `[listen] max_startups_per_address`.
    PerAddress(usize),
}

impl StartupLimitHit {
    /// The configuration key of the limit.
    pub(crate) fn key(self) -> &'static str {
        match self {
            StartupLimitHit::Overall(_) => "max_startups",
            StartupLimitHit::PerAddress(_) => "max_startups_per_address",
        }
    }

    pub(crate) fn size(self) -> usize {
        match self {
            StartupLimitHit::Overall(size) | StartupLimitHit::PerAddress(size) => size,
        }
    }
}

/// A connection's place among those starting up, given back when dropped.
pub(crate) struct StartupSlot {
    limits: Arc<StartupLimits>,
    address: IpAddr,
}

impl StartupLimits {
    pub(crate) fn new(max: usize, max_per_address: usize) -> Arc<StartupLimits> {
        Arc::new(StartupLimits {
            state: Mutex::new(Startups {
                max,
                max_per_address,
                total: 0,
                by_address: HashMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Startups> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New sizes apply to the next connection; connections already over a
    /// lowered limit keep their slots until they finish starting up.
    pub(crate) fn resize(&self, max: usize, max_per_address: usize) {
        let mut state = self.state();
        state.max = max;
        state.max_per_address = max_per_address;
    }

    /// A slot for a connection from `peer`, or which limit is reached.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        peer: IpAddr,
    ) -> Result<StartupSlot, StartupLimitHit> {
        let address = counted_address(peer);
        let mut state = self.state();
        if state.total >= state.max {
            return Err(StartupLimitHit::Overall(state.max));
        }
        let from_address = state.by_address.get(&address).copied().unwrap_or(0);
        if from_address >= state.max_per_address {
            return Err(StartupLimitHit::PerAddress(state.max_per_address));
        }
        *state.by_address.entry(address).or_default() += 1;
        state.total += 1;
        Ok(StartupSlot {
            limits: Arc::clone(self),
            address,
        })
    }

    /// Connections starting up now.
    #[cfg(test)]
    pub(crate) fn starting(&self) -> usize {
        self.state().total
    }
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut state = self.limits.state();
        state.total -= 1;
        if let Some(count) = state.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                state.by_address.remove(&self.address);
            }
        }
    }
}

/// The address a client is counted under: an IPv4 address (also one
/// mapped into IPv6) as it is, an IPv6 address by its /64 network, the
/// smallest block a single host or customer is usually given, so that one
/// host cannot take a fresh share with each of its addresses.
fn counted_address(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !(u128::MAX >> 64);
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
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

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_share_and_others_the_rest() {
        let limits = StartupLimits::new(4, 2);
        let flood: Vec<_> = (0..2)
            .map(|_| limits.try_acquire(ip("127.0.0.2")).unwrap())
            .collect();
        assert_eq!(
            limits.try_acquire(ip("127.0.0.2")).err(),
            Some(StartupLimitHit::PerAddress(2))
        );
        let other = limits.try_acquire(ip("127.0.0.3")).unwrap();
        let _third = limits.try_acquire(ip("127.0.0.4")).unwrap();
        assert_eq!(
            limits.try_acquire(ip("127.0.0.5")).err(),
            Some(StartupLimitHit::Overall(4))
        );
        assert_eq!(limits.starting(), 4);
        drop(flood);
        drop(other);
        assert_eq!(limits.starting(), 1);
        assert!(limits.try_acquire(ip("127.0.0.2")).is_ok());
        assert!(
            limits.state().by_address.len() <= 2,
            "addresses with none are forgotten"
        );
    }

    #[test]
    fn resizing_applies_to_the_next_connection_and_keeps_the_count() {
        let limits = StartupLimits::new(10, 1);
        let first = limits.try_acquire(ip("10.0.0.1")).unwrap();
        assert!(limits.try_acquire(ip("10.0.0.1")).is_err());
        limits.resize(10, 3);
        let second = limits.try_acquire(ip("10.0.0.1")).unwrap();
        limits.resize(1, 3);
        assert_eq!(
            limits.try_acquire(ip("10.0.0.2")).err(),
            Some(StartupLimitHit::Overall(1))
        );
        drop((first, second));
        assert_eq!(limits.starting(), 0);
        assert!(limits.try_acquire(ip("10.0.0.2")).is_ok());
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64_network_and_mapped_ipv4_as_ipv4() {
        let limits = StartupLimits::new(10, 2);
        let _a = limits.try_acquire(ip("2001:db8:1:2::1")).unwrap();
        let _b = limits.try_acquire(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(limits.try_acquire(ip("2001:db8:1:2:abcd::1")).is_err());
        assert!(limits.try_acquire(ip("2001:db8:1:3::1")).is_ok());
        let _c = limits.try_acquire(ip("192.0.2.7")).unwrap();
        let _d = limits.try_acquire(ip("::ffff:192.0.2.7")).unwrap();
        assert!(limits.try_acquire(ip("192.0.2.7")).is_err());
    }
}
