//! Placement planning: which nodes hold which shard of which model.
//!
//! Pure: nodes, models, the current placement and what nodes report held go in; the new
//! placement comes out. The controller (on the elected node) runs it and writes what changed.
//!
//! **Weighted rendezvous hashing.** Every (node, model, shard) gets a score from xxh3 of the
//! three, weighted by the node's memory capacity (`w / -ln(u)` with `u` uniform in (0, 1), the
//! weighted form of highest-random-weight hashing); a shard goes to the `R` highest scores among
//! the eligible nodes. A node's score for a shard never depends on the other nodes, so adding a
//! node moves only the replicas it now wins (about `1/(N+1)` of them) and removing one moves
//! only the replicas it had.
//!
//! **Invariants of the result:**
//! - the first entries of `assignment[s]` are the desired replicas: `min(R, eligible)` distinct
//!   nodes, none draining, none over its capacity;
//! - make before break: a live node that held the shard and is no longer desired stays listed
//!   (after the desired ones) until every desired replica reports the shard held; a node that is
//!   not a candidate (dead: no node record) is dropped at once;
//! - a shard with no eligible node keeps its old live replicas;
//! - `epoch` is bumped exactly when the record changes.

use std::collections::{BTreeMap, BTreeSet};

use xxhash_rust::xxh3::xxh3_64;

use crate::records::Placement;

/// One model to place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDemand {
    pub model: String,
    pub shards: u32,
    /// Replicas each shard should have (capped at the eligible nodes).
    pub replicas: u32,
    /// Memory of one replica of one shard, estimated (0 when not known yet).
    pub shard_bytes: u64,
}

/// One alive node the planner may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// 0 = no limit.
    pub capacity_bytes: u64,
    /// A draining node gets no new replicas and loses its own once they are replaced.
    pub draining: bool,
}

/// New placements of `models`. `held(model, shard, node)` says a node reports the shard held.
///
/// Models are planned in name order and shards in index order, so the capacity accounting (and
/// therefore the result) is deterministic and does not depend on the order of the inputs.
pub fn plan(
    models: &[ModelDemand],
    nodes: &[Candidate],
    current: &BTreeMap<String, Placement>,
    held: &dyn Fn(&str, u32, &str) -> bool,
) -> BTreeMap<String, Placement> {
    // Sorted, de-duplicated candidates: the input order must not matter.
    let mut cands: BTreeMap<&str, &Candidate> = BTreeMap::new();
    for c in nodes {
        cands.entry(c.id.as_str()).or_insert(c);
    }
    let alive: BTreeSet<&str> = cands.keys().copied().collect();
    let weights = weights(&cands);
    let mut planned_bytes: BTreeMap<&str, u64> = BTreeMap::new();

    let mut demands: Vec<&ModelDemand> = models.iter().collect();
    demands.sort_by(|a, b| a.model.cmp(&b.model));
    demands.dedup_by(|a, b| a.model == b.model);

    let mut out = BTreeMap::new();
    for d in demands {
        let old = current
            .get(&d.model)
            .filter(|p| p.shards == d.shards && p.assignment.len() == d.shards as usize);
        let mut assignment = Vec::with_capacity(d.shards as usize);
        for shard in 0..d.shards {
            let mut ranked: Vec<(f64, &str)> = cands
                .values()
                .filter(|c| !c.draining)
                .map(|c| {
                    (
                        score(&c.id, &d.model, shard, weights[c.id.as_str()]),
                        c.id.as_str(),
                    )
                })
                .collect();
            // Highest score first; the id breaks (astronomically unlikely) ties.
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
            let mut desired: Vec<&str> = Vec::new();
            for (_, id) in ranked {
                if desired.len() >= d.replicas as usize {
                    break;
                }
                let cap = cands[id].capacity_bytes;
                let used = planned_bytes.get(id).copied().unwrap_or(0);
                if cap != 0 && used.saturating_add(d.shard_bytes) > cap {
                    continue;
                }
                desired.push(id);
            }
            for id in &desired {
                *planned_bytes.entry(id).or_insert(0) += d.shard_bytes;
            }
            let previous: Vec<&str> = old
                .and_then(|p| p.assignment.get(shard as usize))
                .map(|v| v.iter().map(String::as_str).collect())
                .unwrap_or_default();
            // Make before break: the leaving replicas serve until every desired one holds the
            // shard. With no desired replica at all (no eligible node) they simply stay.
            let ready = desired.iter().filter(|n| held(&d.model, shard, n)).count();
            let keep_old = desired.is_empty() || ready < desired.len();
            let mut list: Vec<String> = desired.iter().map(|s| s.to_string()).collect();
            if keep_old {
                for n in previous {
                    if alive.contains(n) && !desired.contains(&n) && !list.iter().any(|l| l == n) {
                        list.push(n.to_string());
                    }
                }
            }
            assignment.push(list);
        }
        let mut p = Placement {
            model: d.model.clone(),
            shards: d.shards,
            replicas: d.replicas,
            epoch: 1,
            assignment,
        };
        if let Some(cur) = current.get(&d.model) {
            p.epoch = cur.epoch;
            if cur.shards != p.shards
                || cur.replicas != p.replicas
                || cur.assignment != p.assignment
            {
                p.epoch = cur.epoch + 1;
            }
        }
        out.insert(d.model.clone(), p);
    }
    out
}

/// Rendezvous weights: a node's memory capacity, relative to the others'. Nodes with no limit
/// weigh as much as the largest limited node (all the same when none is limited).
fn weights<'a>(cands: &BTreeMap<&'a str, &Candidate>) -> BTreeMap<&'a str, f64> {
    let largest = cands
        .values()
        .map(|c| c.capacity_bytes)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    cands
        .iter()
        .map(|(id, c)| {
            let w = if c.capacity_bytes == 0 {
                1.0
            } else {
                c.capacity_bytes as f64 / largest
            };
            (*id, w)
        })
        .collect()
}

/// The weighted rendezvous score of `node` for one shard.
fn score(node: &str, model: &str, shard: u32, weight: f64) -> f64 {
    let mut buf = Vec::with_capacity(node.len() + model.len() + 6);
    buf.extend_from_slice(node.as_bytes());
    buf.push(0);
    buf.extend_from_slice(model.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&shard.to_le_bytes());
    let h = xxh3_64(&buf);
    // 53 random bits into (0, 1), never 0 or 1, so the logarithm is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    weight / -u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(id: &str) -> Candidate {
        Candidate {
            id: id.into(),
            capacity_bytes: 0,
            draining: false,
        }
    }

    fn nodes(n: usize) -> Vec<Candidate> {
        (0..n).map(|i| node(&format!("node-{i}"))).collect()
    }

    fn demand(model: &str, shards: u32, replicas: u32) -> ModelDemand {
        ModelDemand {
            model: model.into(),
            shards,
            replicas,
            shard_bytes: 0,
        }
    }

    fn all_held(_: &str, _: u32, _: &str) -> bool {
        true
    }

    fn none_held(_: &str, _: u32, _: &str) -> bool {
        false
    }

    /// (model, shard, node) triples of a placement set.
    fn replicas(p: &BTreeMap<String, Placement>) -> BTreeSet<(String, u32, String)> {
        p.values()
            .flat_map(|p| {
                p.assignment.iter().enumerate().flat_map(move |(s, ns)| {
                    ns.iter()
                        .map(move |n| (p.model.clone(), s as u32, n.clone()))
                })
            })
            .collect()
    }

    #[test]
    fn first_plan_places_every_shard_r_times() {
        let out = plan(
            &[demand("ctr", 8, 2), demand("cvr", 3, 5)],
            &nodes(3),
            &BTreeMap::new(),
            &all_held,
        );
        let ctr = &out["ctr"];
        assert_eq!(ctr.epoch, 1);
        assert_eq!(ctr.assignment.len(), 8);
        for a in &ctr.assignment {
            assert_eq!(a.len(), 2);
            assert_ne!(a[0], a[1]);
        }
        // R = 5 is capped at the 3 eligible nodes.
        for a in &out["cvr"].assignment {
            assert_eq!(a.iter().collect::<BTreeSet<_>>().len(), 3);
        }
    }

    #[test]
    fn unchanged_input_keeps_the_epoch() {
        let ms = [demand("ctr", 16, 2)];
        let ns = nodes(4);
        let first = plan(&ms, &ns, &BTreeMap::new(), &all_held);
        let second = plan(&ms, &ns, &first, &all_held);
        assert_eq!(first, second);
        let mut more = ns.clone();
        more.push(node("node-new"));
        let third = plan(&ms, &more, &second, &all_held);
        assert_eq!(third["ctr"].epoch, 2, "a change bumps the epoch once");
    }

    #[test]
    fn draining_node_keeps_replicas_until_replacements_are_held() {
        let ms = [demand("ctr", 16, 2)];
        let mut ns = nodes(4);
        let before = plan(&ms, &ns, &BTreeMap::new(), &all_held);
        let drained = "node-1";
        assert!(!before["ctr"].shards_of(drained).is_empty());
        ns[1].draining = true;
        // Replacements not loaded yet: the draining node stays listed, after the new ones.
        let during = plan(&ms, &ns, &before, &none_held);
        assert_eq!(
            during["ctr"].shards_of(drained),
            before["ctr"].shards_of(drained)
        );
        for a in &during["ctr"].assignment {
            if a.iter().any(|n| n == drained) {
                assert_eq!(a.len(), 3, "{a:?}");
                assert_eq!(a[2], drained, "the leaving replica is listed last: {a:?}");
            } else {
                assert_eq!(a.len(), 2);
            }
        }
        // Replacements hold their shards: the draining node is released.
        let after = plan(&ms, &ns, &during, &all_held);
        assert!(after["ctr"].shards_of(drained).is_empty());
        for a in &after["ctr"].assignment {
            assert_eq!(a.len(), 2);
        }
        assert!(after["ctr"].epoch > during["ctr"].epoch);
    }

    #[test]
    fn dead_node_is_dropped_at_once_and_no_eligible_node_keeps_old_replicas() {
        let ms = [demand("ctr", 4, 2)];
        let ns = nodes(3);
        let before = plan(&ms, &ns, &BTreeMap::new(), &all_held);
        // node-0 is gone (no record): it disappears even though nothing holds the new replicas.
        let after = plan(&ms, &ns[1..], &before, &none_held);
        assert!(after["ctr"].shards_of("node-0").is_empty());
        // Every node draining: nothing is eligible, the live replicas stay as they were.
        let draining: Vec<Candidate> = ns
            .iter()
            .map(|c| Candidate {
                draining: true,
                ..c.clone()
            })
            .collect();
        let kept = plan(&ms, &draining, &before, &all_held);
        assert_eq!(kept["ctr"].assignment, before["ctr"].assignment);
    }

    #[test]
    fn capacity_is_respected_and_weights_balance_memory() {
        // One big node and two small ones: the big one takes about half of the replicas.
        let ns = vec![
            Candidate {
                id: "big".into(),
                capacity_bytes: 2_000,
                draining: false,
            },
            Candidate {
                id: "small-1".into(),
                capacity_bytes: 1_000,
                draining: false,
            },
            Candidate {
                id: "small-2".into(),
                capacity_bytes: 1_000,
                draining: false,
            },
        ];
        let ms = [ModelDemand {
            model: "ctr".into(),
            shards: 100,
            replicas: 1,
            shard_bytes: 30,
        }];
        let out = plan(&ms, &ns, &BTreeMap::new(), &all_held);
        let count = |id: &str| out["ctr"].shards_of(id).len() as u64;
        for c in &ns {
            assert!(
                count(&c.id) * 30 <= c.capacity_bytes,
                "{} over capacity",
                c.id
            );
        }
        assert_eq!(count("big") + count("small-1") + count("small-2"), 100);
        assert!(count("big") >= 35, "big node got {} of 100", count("big"));
        // Not enough room for a second replica anywhere: R is capped by what fits.
        let tight = [ModelDemand {
            model: "ctr".into(),
            shards: 4,
            replicas: 3,
            shard_bytes: 900,
        }];
        let out = plan(&tight, &ns, &BTreeMap::new(), &all_held);
        for c in &ns {
            let used = out["ctr"].shards_of(&c.id).len() as u64 * 900;
            assert!(used <= c.capacity_bytes, "{} over capacity: {used}", c.id);
        }
    }

    #[test]
    fn shard_count_change_replans_from_scratch() {
        let ns = nodes(3);
        let before = plan(&[demand("ctr", 4, 2)], &ns, &BTreeMap::new(), &none_held);
        let after = plan(&[demand("ctr", 8, 2)], &ns, &before, &none_held);
        assert_eq!(after["ctr"].assignment.len(), 8);
        assert!(after["ctr"].assignment.iter().all(|a| a.len() == 2));
        assert_eq!(after["ctr"].epoch, before["ctr"].epoch + 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_shard_gets_min_r_eligible_distinct_replicas(
            n in 1usize..8, shards in 1u32..40, r in 1u32..5,
            draining in proptest::collection::vec(any::<bool>(), 8),
        ) {
            let mut ns = nodes(n);
            for (c, d) in ns.iter_mut().zip(&draining) {
                c.draining = *d;
            }
            let eligible = ns.iter().filter(|c| !c.draining).count();
            let out = plan(&[demand("m", shards, r)], &ns, &BTreeMap::new(), &all_held);
            let p = &out["m"];
            prop_assert_eq!(p.assignment.len(), shards as usize);
            for a in &p.assignment {
                let set: BTreeSet<&String> = a.iter().collect();
                prop_assert_eq!(set.len(), a.len(), "duplicates in {:?}", a);
                prop_assert_eq!(a.len(), (r as usize).min(eligible));
                for id in a {
                    prop_assert!(ns.iter().any(|c| &c.id == id && !c.draining));
                }
            }
        }

        #[test]
        fn adding_a_node_moves_about_one_in_n_plus_one(n in 2usize..8, r in 1u32..3) {
            let ms = [demand("a", 100, r), demand("b", 60, r)];
            let ns = nodes(n);
            let before = plan(&ms, &ns, &BTreeMap::new(), &all_held);
            let mut more = ns.clone();
            more.push(node("joiner"));
            let after = plan(&ms, &more, &before, &all_held);
            let old = replicas(&before);
            let new = replicas(&after);
            // Every new replica is on the new node; nothing else moved between old nodes.
            for (m, s, id) in new.difference(&old) {
                prop_assert_eq!(id.as_str(), "joiner", "{}/{} moved to {}", m, s, id);
            }
            let moved = new.difference(&old).count() as f64;
            let total = old.len() as f64;
            let expected = total / (n as f64 + 1.0);
            // 160 shards: the share is binomial; 2x plus slack is far outside its spread.
            prop_assert!(moved <= 2.0 * expected + 10.0, "moved {moved} of {total}");
            prop_assert!(moved >= 0.3 * expected - 5.0, "moved {moved} of {total}");
        }

        #[test]
        fn removing_a_node_moves_only_its_replicas(n in 3usize..8, r in 1u32..3, gone in 0usize..8) {
            let gone = gone % n;
            let ms = [demand("a", 50, r)];
            let ns = nodes(n);
            let before = plan(&ms, &ns, &BTreeMap::new(), &all_held);
            let rest: Vec<Candidate> =
                ns.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, c)| c.clone()).collect();
            let after = plan(&ms, &rest, &before, &all_held);
            let gone_id = &ns[gone].id;
            for (s, (b, a)) in before["a"].assignment.iter().zip(&after["a"].assignment).enumerate() {
                if b.contains(gone_id) {
                    // The survivors stay; exactly one replacement joins.
                    for id in b.iter().filter(|id| *id != gone_id) {
                        prop_assert!(a.contains(id), "shard {} lost {}", s, id);
                    }
                    prop_assert!(!a.contains(gone_id));
                } else {
                    let bs: BTreeSet<&String> = b.iter().collect();
                    let as_: BTreeSet<&String> = a.iter().collect();
                    prop_assert_eq!(bs, as_, "shard {} changed without losing a node", s);
                }
            }
        }

        #[test]
        fn capacity_is_never_exceeded(
            caps in proptest::collection::vec(0u64..5_000, 1..6),
            shard_bytes in 1u64..800, shards in 1u32..30, r in 1u32..4,
        ) {
            let ns: Vec<Candidate> = caps.iter().enumerate().map(|(i, c)| Candidate {
                id: format!("n{i}"), capacity_bytes: *c, draining: false,
            }).collect();
            let ms = [ModelDemand { model: "m".into(), shards, replicas: r, shard_bytes }];
            let out = plan(&ms, &ns, &BTreeMap::new(), &all_held);
            for c in &ns {
                let used = out["m"].shards_of(&c.id).len() as u64 * shard_bytes;
                prop_assert!(c.capacity_bytes == 0 || used <= c.capacity_bytes,
                    "{} uses {} of {}", c.id, used, c.capacity_bytes);
            }
        }

        #[test]
        fn deterministic_whatever_the_input_order(n in 1usize..8, seed in any::<u64>()) {
            let ms = vec![demand("a", 20, 2), demand("b", 7, 3)];
            let ns = nodes(n);
            let one = plan(&ms, &ns, &BTreeMap::new(), &all_held);
            let mut shuffled = ns.clone();
            let len = shuffled.len();
            shuffled.rotate_left((seed as usize) % len);
            let mut ms2 = ms.clone();
            ms2.reverse();
            let two = plan(&ms2, &shuffled, &BTreeMap::new(), &all_held);
            prop_assert_eq!(one, two);
        }
    }
}
