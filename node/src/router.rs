//! Agent selection for queued conversations: pure functions over a snapshot of agent load.
//!
//! The capacity invariant lives here: a strategy never returns an agent whose load (assigned +
//! offered conversations) is at or above its capacity. The engine, the single writer of agent load,
//! applies the choice before routing anything else, so the invariant holds globally.

use crate::config::Strategy;

/// What the router knows about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub skills: &'a [String],
    pub capacity: u32,
    /// Assigned plus offered conversations.
    pub load: u32,
    /// Online with at least one live connection.
    pub available: bool,
}

impl Candidate<'_> {
    fn has_room(&self) -> bool {
        self.available && self.load < self.capacity
    }
    fn ratio(&self) -> f64 {
        if self.capacity == 0 { f64::INFINITY } else { f64::from(self.load) / f64::from(self.capacity) }
    }
    fn has_skills(&self, wanted: &[String]) -> bool {
        wanted.iter().all(|w| self.skills.iter().any(|s| s.eq_ignore_ascii_case(w)))
    }
}

/// One routing request.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Hash key for ring strategies (the visitor id: a returning visitor meets the same agent).
    pub key: &'a str,
    pub skills: &'a [String],
    /// Agents not to offer to (declined or let the offer expire).
    pub exclude: &'a [String],
}

/// Routing parameters from config.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub strategy: Strategy,
    pub load_threshold: f64,
    pub virtual_nodes: u32,
}

/// Router state that persists between calls (the round-robin cursor).
#[derive(Debug, Default, Clone)]
pub struct Router {
    rr_cursor: u64,
}

impl Router {
    /// Pick an agent for `req` among `agents`, or `None` when nobody eligible has room.
    ///
    /// Eligibility: available, below capacity, not excluded, and holding every requested skill. When no
    /// agent holds all requested skills the request is widened to every agent (a visitor asking for
    /// `vip` still gets help), so a skill never strands a conversation.
    pub fn choose<'a>(&mut self, params: Params, req: &Request<'_>, agents: &[Candidate<'a>]) -> Option<&'a str> {
        let not_excluded = |c: &&Candidate<'a>| !req.exclude.iter().any(|e| e == c.id);
        let skilled: Vec<&Candidate<'a>> =
            agents.iter().filter(not_excluded).filter(|c| c.has_skills(req.skills)).collect();
        let pool: Vec<&Candidate<'a>> =
            if skilled.iter().any(|c| c.has_room()) { skilled } else { agents.iter().filter(not_excluded).collect() };
        let choice = match params.strategy {
            Strategy::SkillsRing => ring_choice(params, req.key, &pool).or_else(|| least_loaded(&pool)),
            Strategy::RoundRobin => self.round_robin(&pool),
            Strategy::LeastLoaded => least_loaded(&pool),
        }?;
        debug_assert!(choice.has_room());
        Some(choice.id)
    }

    fn round_robin<'p, 'a>(&mut self, pool: &[&'p Candidate<'a>]) -> Option<&'p Candidate<'a>> {
        let mut sorted: Vec<&'p Candidate<'a>> = pool.iter().copied().filter(|c| c.has_room()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(|a, b| a.id.cmp(b.id));
        let pick = sorted[(self.rr_cursor % sorted.len() as u64) as usize];
        self.rr_cursor = self.rr_cursor.wrapping_add(1);
        Some(pick)
    }
}

/// The seed design: a consistent-hash ring over the skilled agents; the owner of `key` gets the
/// conversation unless it is at or above the load threshold, in which case `None` sends the caller to
/// the least-loaded fallback pool.
fn ring_choice<'p, 'a>(params: Params, key: &str, pool: &[&'p Candidate<'a>]) -> Option<&'p Candidate<'a>> {
    let mut ring: Vec<(u64, usize)> = Vec::with_capacity(pool.len() * params.virtual_nodes as usize);
    for (i, c) in pool.iter().enumerate() {
        if !c.available || c.capacity == 0 {
            continue;
        }
        for v in 0..params.virtual_nodes {
            ring.push((hash64(format!("{}#{v}", c.id).as_bytes()), i));
        }
    }
    if ring.is_empty() {
        return None;
    }
    ring.sort_unstable();
    let h = hash64(key.as_bytes());
    let at = ring.partition_point(|(p, _)| *p < h) % ring.len();
    let owner = pool[ring[at].1];
    (owner.has_room() && owner.ratio() < params.load_threshold).then_some(owner)
}

fn least_loaded<'p, 'a>(pool: &[&'p Candidate<'a>]) -> Option<&'p Candidate<'a>> {
    pool.iter()
        .copied()
        .filter(|c| c.has_room())
        .min_by(|a, b| a.ratio().total_cmp(&b.ratio()).then(a.load.cmp(&b.load)).then(a.id.cmp(b.id)))
}

/// FNV-1a followed by a splitmix64 finaliser: stable across processes and versions (ring positions
/// must not change when the binary is rebuilt).
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{Just, any, prop_assert, prop_oneof, proptest};

    fn params(strategy: Strategy) -> Params {
        Params { strategy, load_threshold: 0.8, virtual_nodes: 32 }
    }

    struct A {
        id: String,
        skills: Vec<String>,
        capacity: u32,
        load: u32,
        available: bool,
    }

    fn cands(agents: &[A]) -> Vec<Candidate<'_>> {
        agents
            .iter()
            .map(|a| Candidate {
                id: &a.id,
                skills: &a.skills,
                capacity: a.capacity,
                load: a.load,
                available: a.available,
            })
            .collect()
    }

    fn agent(id: &str, skills: &[&str], capacity: u32, load: u32) -> A {
        A { id: id.into(), skills: skills.iter().map(|s| s.to_string()).collect(), capacity, load, available: true }
    }

    #[test]
    fn skills_ring_is_sticky_for_a_visitor_and_prefers_skilled_agents() {
        let agents = vec![agent("a", &["billing"], 5, 0), agent("b", &["zh"], 5, 0), agent("c", &["zh"], 5, 0)];
        let mut r = Router::default();
        let skills = vec!["zh".to_string()];
        let req = Request { key: "visitor-1", skills: &skills, exclude: &[] };
        let first = r.choose(params(Strategy::SkillsRing), &req, &cands(&agents)).unwrap();
        assert!(first == "b" || first == "c");
        for _ in 0..5 {
            assert_eq!(r.choose(params(Strategy::SkillsRing), &req, &cands(&agents)), Some(first));
        }
    }

    #[test]
    fn skills_ring_falls_back_to_least_loaded_when_owner_is_busy() {
        let skills: Vec<String> = vec![];
        let req = Request { key: "visitor-1", skills: &skills, exclude: &[] };
        let mut agents = vec![agent("a", &[], 5, 0), agent("b", &[], 5, 0)];
        let mut r = Router::default();
        let owner = r.choose(params(Strategy::SkillsRing), &req, &cands(&agents)).unwrap().to_string();
        // Load the owner to its threshold (4/5 = 0.8): the other agent gets it.
        for a in agents.iter_mut() {
            if a.id == owner {
                a.load = 4;
            }
        }
        let next = r.choose(params(Strategy::SkillsRing), &req, &cands(&agents)).unwrap();
        assert_ne!(next, owner);
    }

    #[test]
    fn missing_skill_widens_to_all_agents() {
        let agents = vec![agent("a", &["billing"], 1, 0)];
        let skills = vec!["vip".to_string()];
        let req = Request { key: "v", skills: &skills, exclude: &[] };
        assert_eq!(Router::default().choose(params(Strategy::LeastLoaded), &req, &cands(&agents)), Some("a"));
    }

    #[test]
    fn round_robin_rotates_and_least_loaded_balances() {
        let agents = vec![agent("a", &[], 5, 0), agent("b", &[], 5, 0), agent("c", &[], 5, 3)];
        let req = Request { key: "v", skills: &[], exclude: &[] };
        let mut r = Router::default();
        let picks: Vec<&str> =
            (0..3).map(|_| r.choose(params(Strategy::RoundRobin), &req, &cands(&agents)).unwrap()).collect();
        assert_eq!(picks, vec!["a", "b", "c"]);
        assert_eq!(r.choose(params(Strategy::LeastLoaded), &req, &cands(&agents)), Some("a"));
    }

    #[test]
    fn excluded_and_unavailable_agents_are_skipped() {
        let mut agents = vec![agent("a", &[], 5, 0), agent("b", &[], 5, 0)];
        agents[1].available = false;
        let ex = vec!["a".to_string()];
        let req = Request { key: "v", skills: &[], exclude: &ex };
        assert_eq!(Router::default().choose(params(Strategy::LeastLoaded), &req, &cands(&agents)), None);
    }

    fn strategy() -> impl proptest::strategy::Strategy<Value = Strategy> {
        prop_oneof![Just(Strategy::SkillsRing), Just(Strategy::RoundRobin), Just(Strategy::LeastLoaded)]
    }

    proptest! {
        /// Whatever the strategy, skills, availability and order of arrivals and departures, no agent is
        /// ever given more than its capacity, and a conversation waits only when nobody has room.
        #[test]
        fn capacity_is_never_exceeded(
            strat in strategy(),
            caps in proptest::collection::vec(0u32..4, 1..6),
            avail in proptest::collection::vec(any::<bool>(), 6),
            ops in proptest::collection::vec((any::<bool>(), 0u8..3, any::<u16>()), 1..200),
        ) {
            let skill_names = ["billing", "zh", "vip"];
            let mut agents: Vec<A> = caps.iter().enumerate().map(|(i, c)| A {
                id: format!("agent-{i}"),
                skills: vec![skill_names[i % 3].to_string()],
                capacity: *c,
                load: 0,
                available: avail[i],
            }).collect();
            let mut r = Router::default();
            for (arrive, skill, key) in ops {
                if arrive {
                    let skills = vec![skill_names[skill as usize].to_string()];
                    let k = key.to_string();
                    let req = Request { key: &k, skills: &skills, exclude: &[] };
                    let p = Params { strategy: strat, load_threshold: 0.75, virtual_nodes: 8 };
                    let picked = r.choose(p, &req, &cands(&agents)).map(str::to_owned);
                    match picked {
                        Some(id) => {
                            let a = agents.iter_mut().find(|a| a.id == id).unwrap();
                            prop_assert!(a.available);
                            a.load += 1;
                            prop_assert!(a.load <= a.capacity, "{} over capacity", a.id);
                        }
                        None => prop_assert!(agents.iter().all(|a| !a.available || a.load >= a.capacity)),
                    }
                } else if let Some(a) = agents.iter_mut().filter(|a| a.load > 0).nth(key as usize % 3) {
                    a.load -= 1;
                }
            }
        }
    }
}
