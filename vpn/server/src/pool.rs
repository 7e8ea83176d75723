//! The address pool: which client has which address, and for how long a
//! disconnected client's address stays reserved for it.
//!
//! A client with an identity (a configured name, or a hash of its token and
//! the client id it stores) keeps its lease for `lease_time` after its last
//! session, and across server restarts ([`IpPool::snapshot`] and
//! [`IpPool::restore`]): it gets its address back whatever order clients
//! return in and whether or not it asks for it. A client without one keeps
//! its address for the shorter grace period, and only gets it back by asking
//! (`reconnect {previous_ip}`). Fixed addresses (`[[auth.clients]] ip`) are
//! never given to anyone else.
//!
//! Pure bookkeeping, no I/O: time is passed in, so every rule is unit-tested.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant, SystemTime};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Who holds a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Index of the credential (`[auth] tokens`, then `[[auth.clients]]`).
    pub token: usize,
    /// The stable identity (`name:<name>` or `id:<hash>`); `None`: an
    /// anonymous client (no name, no client id).
    pub identity: Option<String>,
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
    /// The address came from this identity's lease (or fixed address).
    pub from_lease: bool,
}

/// The pool has no free address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address pool exhausted: all {0} addresses are in use or held")]
pub struct Exhausted(pub usize);

/// A lease as kept in the lease file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    /// `name:<name>` or `id:<hash>`; never a token.
    pub identity: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// When the lease ends if its client does not come back, seconds since
    /// the Unix epoch.
    pub expires_unix: u64,
}

/// Addresses of one subnet, less the network, broadcast and server addresses.
#[derive(Debug)]
pub struct IpPool {
    net: Ipv4Net,
    server_ip: Ipv4Addr,
    grace: Duration,
    lease_time: Duration,
    leases: HashMap<Ipv4Addr, Lease>,
    /// Fixed addresses: identity → address, and the reverse.
    fixed: HashMap<String, Ipv4Addr>,
    reserved: HashMap<Ipv4Addr, String>,
}

impl IpPool {
    /// A pool over `net` (a /30 or larger) excluding `server_ip`; anonymous
    /// clients' addresses are held for `grace` after they leave, identified
    /// clients' for `grace` too until [`IpPool::with_lease_time`].
    pub fn new(net: Ipv4Net, server_ip: Ipv4Addr, grace: Duration) -> Self {
        Self {
            net: net.trunc(),
            server_ip,
            grace,
            lease_time: grace,
            leases: HashMap::new(),
            fixed: HashMap::new(),
            reserved: HashMap::new(),
        }
    }

    /// How long an identified client's lease outlives its last session.
    pub fn with_lease_time(mut self, lease_time: Duration) -> Self {
        self.lease_time = lease_time;
        self
    }

    /// Reserves `addr` for `identity` alone.
    pub fn with_fixed(mut self, identity: String, addr: Ipv4Addr) -> Self {
        self.reserved.insert(addr, identity.clone());
        self.fixed.insert(identity, addr);
        self
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
        if self.reserved.contains_key(&a) {
            return false;
        }
        match self.leases.get(&a) {
            None => true,
            Some(Lease {
                state: State::Held { until },
                ..
            }) => *until <= now,
            Some(_) => false,
        }
    }

    /// The address leased to `identity` (live or held, not expired).
    fn lease_of(&self, identity: &str, now: Instant) -> Option<Ipv4Addr> {
        if let Some(a) = self.fixed.get(identity) {
            return Some(*a);
        }
        self.leases.iter().find_map(|(a, l)| {
            let live = match l.state {
                State::Active { .. } => true,
                State::Held { until } => until > now,
            };
            (live && l.owner.identity.as_deref() == Some(identity)).then_some(*a)
        })
    }

    /// Gives `owner` an address for `session`: its identity's lease if it
    /// has one, else `previous` when it may have it back, else the lowest
    /// free address. A live session on the address it gets is reported in
    /// [`Grant::replaces`].
    pub fn acquire(
        &mut self,
        owner: Owner,
        session: u64,
        previous: Option<Ipv4Addr>,
        now: Instant,
    ) -> Result<Grant, Exhausted> {
        if let Some(addr) = owner
            .identity
            .as_deref()
            .and_then(|id| self.lease_of(id, now))
        {
            let reuse = match previous {
                None => Reuse::NotAsked,
                Some(p) if p == addr => Reuse::Granted,
                Some(_) => Reuse::Refused("this client's lease is another address"),
            };
            return Ok(self.take(addr, owner, session, reuse, true));
        }
        let mut reuse = Reuse::NotAsked;
        if let Some(prev) = previous {
            reuse = self.may_reuse(&owner, prev, now);
            if reuse == Reuse::Granted {
                return Ok(self.take(prev, owner, session, reuse, false));
            }
        }
        let addr = self
            .hosts()
            .find(|a| self.is_free(*a, now))
            .ok_or(Exhausted(self.capacity()))?;
        Ok(self.take(addr, owner, session, reuse, false))
    }

    fn take(
        &mut self,
        addr: Ipv4Addr,
        owner: Owner,
        session: u64,
        reuse: Reuse,
        from_lease: bool,
    ) -> Grant {
        let old = self.leases.insert(
            addr,
            Lease {
                owner,
                state: State::Active { session },
            },
        );
        let replaces = match old {
            Some(Lease {
                state: State::Active { session },
                ..
            }) => Some(session),
            _ => None,
        };
        Grant {
            addr,
            reuse,
            replaces,
            from_lease,
        }
    }

    fn may_reuse(&self, owner: &Owner, prev: Ipv4Addr, now: Instant) -> Reuse {
        if !self.usable(prev) {
            return Reuse::Refused("not an assignable address of this subnet");
        }
        if self.reserved.contains_key(&prev) {
            return Reuse::Refused("reserved for another client");
        }
        match self.leases.get(&prev) {
            None => Reuse::Granted,
            Some(Lease {
                state: State::Held { until },
                ..
            }) if *until <= now => Reuse::Granted,
            // Anonymous clients of one token may take each other's held
            // address back: without an id they cannot be told apart.
            Some(Lease {
                owner: holder,
                state: State::Held { .. },
            }) if holder.identity.is_none()
                && owner.identity.is_none()
                && holder.token == owner.token =>
            {
                Reuse::Granted
            }
            Some(Lease {
                state: State::Active { .. },
                ..
            }) => Reuse::Refused("in use by another session"),
            Some(_) => Reuse::Refused("held for another client"),
        }
    }

    /// The session ended: hold its address (for `lease_time` if its client
    /// has an identity, else for the grace period). Does nothing if the
    /// address has since been given to another session.
    pub fn release(&mut self, addr: Ipv4Addr, session: u64, now: Instant) {
        if let Some(lease) = self.leases.get_mut(&addr) {
            if matches!(lease.state, State::Active { session: s } if s == session) {
                let hold = if lease.owner.identity.is_some() {
                    self.lease_time
                } else {
                    self.grace
                };
                lease.state = State::Held { until: now + hold };
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

    /// The leases of identified clients, for the lease file. A live lease
    /// ends `lease_time` from now (if the server stops, its client has that
    /// long to come back). Sorted by address.
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> Vec<SavedLease> {
        let unix = |d: Duration| {
            (wall + d)
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let mut out: Vec<SavedLease> = self
            .leases
            .iter()
            .filter_map(|(ip, l)| {
                let identity = l.owner.identity.clone()?;
                let left = match l.state {
                    State::Active { .. } => self.lease_time,
                    State::Held { until } => until.checked_duration_since(now)?,
                };
                Some(SavedLease {
                    identity,
                    ip: *ip,
                    expires_unix: unix(left),
                })
            })
            .collect();
        out.sort_by_key(|l| l.ip);
        out
    }

    /// Takes back leases from the lease file as held ones. Skips expired
    /// leases, addresses outside the pool or reserved for another client,
    /// and duplicates. Returns how many were taken.
    pub fn restore(&mut self, saved: &[SavedLease], now: Instant, wall: SystemTime) -> usize {
        let wall_unix = wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut n = 0;
        for l in saved {
            let Some(left) = l.expires_unix.checked_sub(wall_unix).filter(|s| *s > 0) else {
                continue;
            };
            let left = Duration::from_secs(left).min(self.lease_time);
            let reserved_for_other = self.reserved.get(&l.ip).is_some_and(|id| *id != l.identity);
            if !self.usable(l.ip)
                || reserved_for_other
                || self.leases.contains_key(&l.ip)
                || self.lease_of(&l.identity, now).is_some()
            {
                continue;
            }
            self.leases.insert(
                l.ip,
                Lease {
                    owner: Owner {
                        token: usize::MAX,
                        identity: Some(l.identity.clone()),
                    },
                    state: State::Held { until: now + left },
                },
            );
            n += 1;
        }
        n
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
            identity: None,
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
        let me = who("id:laptop");
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

    fn who(identity: &str) -> Owner {
        Owner {
            token: 0,
            identity: Some(identity.into()),
        }
    }

    #[test]
    fn an_identity_gets_its_lease_back_without_asking_for_lease_time() {
        let mut p = pool("10.100.0.0/24").with_lease_time(GRACE * 10);
        let t0 = Instant::now();
        let a = p.acquire(who("name:alice"), 1, None, t0).expect("a").addr;
        let b = p.acquire(who("name:bob"), 2, None, t0).expect("b").addr;
        p.release(a, 1, t0);
        p.release(b, 2, t0);
        // Past the anonymous grace, within the lease time; bob first.
        let later = t0 + GRACE * 2;
        let gb = p.acquire(who("name:bob"), 3, None, later).expect("bob");
        let stranger = p.acquire(owner(0), 4, None, later).expect("anon");
        let ga = p.acquire(who("name:alice"), 5, None, later).expect("alice");
        assert_eq!((ga.addr, gb.addr), (a, b));
        assert!(ga.from_lease && gb.from_lease);
        assert!(stranger.addr != a && stranger.addr != b);
        // After the lease time it is gone.
        p.release(ga.addr, 5, later);
        let c = p
            .acquire(who("name:carol"), 6, None, later + GRACE * 11)
            .expect("carol");
        assert_eq!(c.addr, a, "alice's expired lease is free again");
    }

    #[test]
    fn a_previous_ip_leased_to_another_identity_is_refused() {
        let mut p = pool("10.100.0.0/24").with_lease_time(GRACE * 10);
        let t0 = Instant::now();
        let a = p.acquire(who("id:x"), 1, None, t0).expect("x").addr;
        p.release(a, 1, t0);
        for claimant in [who("id:y"), owner(0)] {
            let g = p.acquire(claimant, 2, Some(a), t0).expect("other");
            assert_ne!(g.addr, a);
            assert!(matches!(g.reuse, Reuse::Refused(_)));
            p.release(g.addr, 2, t0);
        }
        // Its own identity asking for another address still gets its lease.
        let g = p
            .acquire(who("id:x"), 3, Some(ip("10.100.0.99")), t0)
            .expect("x");
        assert_eq!(g.addr, a);
        assert!(matches!(g.reuse, Reuse::Refused(_)));
    }

    #[test]
    fn a_new_session_of_a_live_identity_replaces_it_at_once() {
        let mut p = pool("10.100.0.0/24");
        let t0 = Instant::now();
        let a = p.acquire(who("name:alice"), 1, None, t0).expect("a").addr;
        // No previous_ip: a fresh process of the same client.
        let g = p.acquire(who("name:alice"), 2, None, t0).expect("again");
        assert_eq!((g.addr, g.replaces), (a, Some(1)));
        p.release(a, 1, t0);
        assert_eq!(p.active(), 1, "the late release of the old one is ignored");
    }

    #[test]
    fn fixed_addresses_go_only_to_their_client() {
        let fixed = ip("10.100.0.2");
        let mut p = pool("10.100.0.0/28").with_fixed("name:alice".into(), fixed);
        let t0 = Instant::now();
        let others: Vec<_> = (0..4)
            .map(|i| p.acquire(owner(0), i, None, t0).expect("free").addr)
            .collect();
        assert!(!others.contains(&fixed), "{others:?}");
        assert!(p.acquire(owner(0), 9, Some(fixed), t0).expect("x").addr != fixed);
        let g = p.acquire(who("name:alice"), 10, None, t0).expect("alice");
        assert_eq!(g.addr, fixed);
    }

    #[test]
    fn leases_survive_a_restart_through_snapshot_and_restore() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut before = pool("10.100.0.0/24").with_lease_time(GRACE * 10);
        let mut got = Vec::new();
        for (i, id) in ["id:a", "id:b", "id:c"].iter().enumerate() {
            got.push(before.acquire(who(id), i as u64, None, t0).expect("a").addr);
        }
        let anon = before.acquire(owner(1), 9, None, t0).expect("anon").addr;
        before.release(got[1], 1, t0);
        let saved = before.snapshot(t0, wall);
        assert_eq!(saved.len(), 3, "anonymous leases are not saved: {saved:?}");
        assert!(saved.iter().all(|l| !l.identity.contains("token")));

        let mut after = pool("10.100.0.0/24").with_lease_time(GRACE * 10);
        let t1 = Instant::now();
        assert_eq!(after.restore(&saved, t1, wall), 3);
        // A fresh anonymous client claims c's address, and gets another.
        let a2 = after.acquire(owner(1), 10, Some(got[2]), t1).expect("anon");
        assert!(!got.contains(&a2.addr));
        let _ = anon;
        for (i, id) in ["id:c", "id:b", "id:a"].iter().enumerate() {
            let g = after
                .acquire(who(id), 20 + i as u64, None, t1)
                .expect("back");
            assert_eq!(g.addr, got[2 - i], "{id}");
        }
        // Expired, outside the subnet and duplicate leases are skipped.
        let mut fresh = pool("10.100.0.0/24");
        let late = wall + GRACE * 20;
        assert_eq!(fresh.restore(&saved, t1, late), 0, "all expired");
        let odd = [
            SavedLease {
                identity: "id:q".into(),
                ip: ip("192.168.0.1"),
                expires_unix: u64::MAX,
            },
            SavedLease {
                identity: "id:q".into(),
                ip: ip("10.100.0.1"),
                expires_unix: u64::MAX,
            },
            SavedLease {
                identity: "id:r".into(),
                ip: ip("10.100.0.8"),
                expires_unix: u64::MAX,
            },
            SavedLease {
                identity: "id:s".into(),
                ip: ip("10.100.0.8"),
                expires_unix: u64::MAX,
            },
        ];
        assert_eq!(fresh.restore(&odd, t1, wall), 1);
    }
}
