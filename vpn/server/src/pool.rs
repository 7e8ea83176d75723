//! The address pool: which client has which address, and for how long a
//! disconnected client's address stays reserved for it.
//!
//! Pure bookkeeping, no I/O: time is passed in, so every rule is unit-tested.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Index of the token in `[auth] tokens`.
    pub token: usize,
    /// The client's self-chosen id, when it sent one.
    pub client_id: Option<String>,
}

impl Owner {
    /// Whether `other` is the same client (same token and the same, present, id).
    fn same_client(&self, other: &Owner) -> bool {
        self.token == other.token && self.client_id.is_some() && self.client_id == other.client_id
    }
}

#[derive(Debug, Clone)]
enum State {
    Active { session: u64 },
    Held { until: Instant },
}

#[derive(Debug, Clone)]
struct Lease {
    owner: Owner,
    state: State,
}

/// What happened to a `reconnect`'s `previous_ip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// No previous address was asked for.
    NotAsked,
    /// The previous address was given back.
    Granted,
    /// The previous address is held by someone else (or unusable); a different one was given.
    Refused(&'static str),
}

/// A successful allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The address.
    pub addr: Ipv4Addr,
    /// What became of the requested address.
    pub reuse: Reuse,
    /// A live session of the same client that this one replaces.
    pub replaces: Option<u64>,
}

/// The pool has no free address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address pool exhausted: all {0} addresses are in use or held")]
pub struct Exhausted(pub usize);

/// Addresses of one subnet, less the network, broadcast and server addresses.
#[derive(Debug)]
pub struct IpPool {
    net: Ipv4Net,
    server_ip: Ipv4Addr,
    grace: Duration,
    leases: HashMap<Ipv4Addr, Lease>,
}

impl IpPool {
    /// A pool over `net` (a /30 or larger) excluding `server_ip`.
    pub fn new(net: Ipv4Net, server_ip: Ipv4Addr, grace: Duration) -> Self {
        Self {
            net: net.trunc(),
            server_ip,
            grace,
            leases: HashMap::new(),
        }
    }

    /// Number of addresses that can be handed out.
    pub fn capacity(&self) -> usize {
        self.hosts().count()
    }

    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.net.hosts().filter(move |a| *a != self.server_ip)
    }

    fn usable(&self, a: Ipv4Addr) -> bool {
        self.net.contains(&a)
            && a != self.net.network()
            && a != self.net.broadcast()
            && a != self.server_ip
    }

    fn is_free(&self, a: Ipv4Addr, now: Instant) -> bool {
        match self.leases.get(&a) {
            None => true,
            Some(Lease {
                state: State::Held { until },
                ..
            }) => *until <= now,
            Some(_) => false,
        }
    }

    /// Gives `owner` an address for `session`: `previous` when it may have it
    /// back, else the lowest free address.
    pub fn acquire(
        &mut self,
        owner: Owner,
        session: u64,
        previous: Option<Ipv4Addr>,
        now: Instant,
    ) -> Result<Grant, Exhausted> {
        let mut reuse = Reuse::NotAsked;
        if let Some(prev) = previous {
            reuse = self.may_reuse(&owner, prev, now);
            if reuse == Reuse::Granted {
                let replaces = match self.leases.get(&prev) {
                    Some(Lease {
                        state: State::Active { session },
                        ..
                    }) => Some(*session),
                    _ => None,
                };
                self.leases.insert(
                    prev,
                    Lease {
                        owner,
                        state: State::Active { session },
                    },
                );
                return Ok(Grant {
                    addr: prev,
                    reuse,
                    replaces,
                });
            }
        }
        let addr = self
            .hosts()
            .find(|a| self.is_free(*a, now))
            .ok_or(Exhausted(self.capacity()))?;
        self.leases.insert(
            addr,
            Lease {
                owner,
                state: State::Active { session },
            },
        );
        Ok(Grant {
            addr,
            reuse,
            replaces: None,
        })
    }

    fn may_reuse(&self, owner: &Owner, prev: Ipv4Addr, now: Instant) -> Reuse {
        if !self.usable(prev) {
            return Reuse::Refused("not an assignable address of this subnet");
        }
        match self.leases.get(&prev) {
            None => Reuse::Granted,
            Some(Lease {
                state: State::Held { until },
                ..
            }) if *until <= now => Reuse::Granted,
            Some(Lease {
                owner: holder,
                state: State::Held { .. },
            }) if holder.token == owner.token => Reuse::Granted,
            Some(Lease {
                owner: holder,
                state: State::Active { .. },
            }) if holder.same_client(owner) => Reuse::Granted,
            Some(Lease {
                state: State::Active { .. },
                ..
            }) => Reuse::Refused("in use by another session"),
            Some(_) => Reuse::Refused("held for another client"),
        }
    }

    /// The session ended: hold its address for the grace period. Does nothing
    /// if the address has since been given to another session.
    pub fn release(&mut self, addr: Ipv4Addr, session: u64, now: Instant) {
        if let Some(lease) = self.leases.get_mut(&addr) {
            if matches!(lease.state, State::Active { session: s } if s == session) {
                lease.state = State::Held {
                    until: now + self.grace,
                };
            }
        }
        // Forget expired holds so the map stays bounded by live clients.
        self.leases
            .retain(|_, l| !matches!(l.state, State::Held { until } if until <= now));
    }

    /// Takes back an address just granted to `session` that will not be used
    /// after all (the session was refused): no hold is kept, so refused
    /// sessions cannot fill the pool with held addresses.
    pub fn undo(&mut self, addr: Ipv4Addr, session: u64) {
        if self
            .leases
            .get(&addr)
            .is_some_and(|l| matches!(l.state, State::Active { session: s } if s == session))
        {
            self.leases.remove(&addr);
        }
    }

    /// Number of addresses with a live session.
    pub fn active(&self) -> usize {
        self.leases
            .values()
            .filter(|l| matches!(l.state, State::Active { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(300);

    fn pool(cidr: &str) -> IpPool {
        let net: Ipv4Net = cidr.parse().expect("cidr");
        let server = net.hosts().next().expect("host");
        IpPool::new(net, server, GRACE)
    }

    fn owner(token: usize) -> Owner {
        Owner {
            token,
            client_id: None,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    #[test]
    fn assigns_sequentially_skipping_network_broadcast_and_server() {
        let mut p = pool("10.100.0.0/29");
        let now = Instant::now();
        let got: Vec<_> = (0..5)
            .map(|i| p.acquire(owner(0), i, None, now).expect("free").addr)
            .collect();
        assert_eq!(
            got,
            [
                "10.100.0.2",
                "10.100.0.3",
                "10.100.0.4",
                "10.100.0.5",
                "10.100.0.6"
            ]
            .map(ip)
            .to_vec()
        );
        assert_eq!(p.capacity(), 5);
    }

    #[test]
    fn exhaustion_is_a_clear_refusal() {
        let mut p = pool("10.100.0.0/30");
        let now = Instant::now();
        assert_eq!(
            p.acquire(owner(0), 1, None, now).expect("one").addr,
            ip("10.100.0.2")
        );
        let e = p.acquire(owner(0), 2, None, now).expect_err("full");
        assert_eq!(e, Exhausted(1));
        assert!(e.to_string().contains("exhausted"));
    }

    #[test]
    fn released_address_is_held_for_the_grace_period_then_reused() {
        let mut p = pool("10.100.0.0/30");
        let t0 = Instant::now();
        let a = p.acquire(owner(0), 1, None, t0).expect("free").addr;
        p.release(a, 1, t0);
        assert!(
            p.acquire(owner(1), 2, None, t0 + GRACE / 2).is_err(),
            "held"
        );
        let g = p
            .acquire(owner(1), 3, None, t0 + GRACE)
            .expect("grace over");
        assert_eq!(g.addr, a);
    }

    #[test]
    fn reconnect_gets_its_own_held_address_back() {
        let mut p = pool("10.100.0.0/24");
        let t0 = Instant::now();
        let a = p.acquire(owner(0), 1, None, t0).expect("a").addr;
        let _b = p.acquire(owner(1), 2, None, t0).expect("b");
        p.release(a, 1, t0);
        let g = p.acquire(owner(0), 3, Some(a), t0).expect("again");
        assert_eq!((g.addr, g.reuse), (a, Reuse::Granted));
    }

    #[test]
    fn reconnect_to_a_free_address_is_granted_after_server_restart() {
        let mut p = pool("10.100.0.0/24");
        let g = p
            .acquire(owner(0), 1, Some(ip("10.100.0.77")), Instant::now())
            .expect("free");
        assert_eq!((g.addr, g.reuse), (ip("10.100.0.77"), Reuse::Granted));
        // The next fresh client still starts at the bottom.
        let n = p.acquire(owner(0), 2, None, Instant::now()).expect("n");
        assert_eq!(n.addr, ip("10.100.0.2"));
    }

    #[test]
    fn reconnect_to_an_address_held_for_another_token_gets_a_different_one() {
        let mut p = pool("10.100.0.0/24");
        let t0 = Instant::now();
        let a = p.acquire(owner(0), 1, None, t0).expect("a").addr;
        p.release(a, 1, t0);
        let g = p.acquire(owner(1), 2, Some(a), t0).expect("other");
        assert_ne!(g.addr, a);
        assert!(matches!(g.reuse, Reuse::Refused(_)));
    }

    #[test]
    fn reconnect_to_an_address_in_use_by_a_live_session_gets_a_different_one() {
        let mut p = pool("10.100.0.0/24");
        let t0 = Instant::now();
        let a = p.acquire(owner(0), 1, None, t0).expect("a").addr;
        let g = p.acquire(owner(0), 2, Some(a), t0).expect("other");
        assert_ne!(
            g.addr, a,
            "same token but no client id: could be another machine"
        );
        assert_eq!(g.replaces, None);
    }

    #[test]
    fn same_client_id_replaces_its_own_stale_session() {
        let mut p = pool("10.100.0.0/24");
        let t0 = Instant::now();
        let me = Owner {
            token: 0,
            client_id: Some("laptop".into()),
        };
        let a = p.acquire(me.clone(), 1, None, t0).expect("a").addr;
        let g = p.acquire(me, 2, Some(a), t0).expect("again");
        assert_eq!((g.addr, g.replaces), (a, Some(1)));
        // The replaced session's late release must not free the new lease.
        p.release(a, 1, t0);
        assert_eq!(p.active(), 1);
    }

    #[test]
    fn reconnect_to_reserved_addresses_is_refused() {
        let mut p = pool("10.100.0.0/24");
        let now = Instant::now();
        for bad in ["10.100.0.0", "10.100.0.1", "10.100.0.255", "192.168.1.5"] {
            let g = p.acquire(owner(0), 1, Some(ip(bad)), now).expect("some");
            assert_ne!(g.addr, ip(bad));
            assert!(matches!(g.reuse, Reuse::Refused(_)), "{bad}");
            p.release(g.addr, 1, now + GRACE * 2);
        }
    }
}
