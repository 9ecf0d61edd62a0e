//! The pure parts of a fan-out: split keys by shard, choose a node per shard, gather the
//! answers back into the caller's key order.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::Rows;

/// Keys of one table that go together, with where each came from in the caller's list.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Part {
    pub(crate) keys: Vec<u64>,
    pub(crate) positions: Vec<usize>,
}

/// The keys of one request (one or several tables) split by shard.
#[derive(Debug)]
pub(crate) struct Split {
    /// `parts[shard][table]`; only shards with keys (shard 0 when there are none at all, so
    /// the request still reaches a node that tells the rows' dims and version).
    pub(crate) parts: BTreeMap<u32, Vec<Part>>,
    /// Keys asked for per table.
    pub(crate) lens: Vec<usize>,
}

impl Split {
    pub(crate) fn new(tables: &[&[u64]], shards: u32) -> Split {
        let mut parts: BTreeMap<u32, Vec<Part>> = BTreeMap::new();
        for (t, keys) in tables.iter().enumerate() {
            for (i, &key) in keys.iter().enumerate() {
                let shard = hopps_format::shard_of(key, shards);
                let part = &mut parts
                    .entry(shard)
                    .or_insert_with(|| vec![Part::default(); tables.len()])[t];
                part.keys.push(key);
                part.positions.push(i);
            }
        }
        if parts.is_empty() {
            parts.insert(0, vec![Part::default(); tables.len()]);
        }
        Split {
            parts,
            lens: tables.iter().map(|k| k.len()).collect(),
        }
    }

    pub(crate) fn shards(&self) -> Vec<u32> {
        self.parts.keys().copied().collect()
    }

    /// What one node is asked: per table, the keys of `shards` (shards of this split).
    pub(crate) fn gather(&self, shards: &[u32]) -> Vec<Part> {
        let mut out = vec![Part::default(); self.lens.len()];
        for s in shards {
            let Some(parts) = self.parts.get(s) else {
                continue;
            };
            for (o, p) in out.iter_mut().zip(parts) {
                o.keys.extend_from_slice(&p.keys);
                o.positions.extend_from_slice(&p.positions);
            }
        }
        out
    }
}

/// A node's answer to its part of the request: rows per table, all of one version.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) node: String,
    pub(crate) version: u64,
    pub(crate) parts: Vec<Part>,
    pub(crate) rows: Vec<Rows>,
}

/// This request's preference for `node`: a hash of the request's seed and the node, so each
/// request ranks the nodes differently (spreading load) while all shards of one request prefer
/// the same nodes (few RPCs per request).
pub(crate) fn rank(seed: u64, node: &str) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    node.hash(&mut h);
    h.finish()
}

/// Chooses a node for each shard and groups shards by node.
///
/// `candidates(shard)` lists the replicas that can serve the shard now; nodes for which
/// `excluded` holds are never chosen (already tried); nodes for which `available` fails (open
/// breaker) are chosen only when no other candidate is left. Returns the first shard without
/// any candidate as the error.
pub(crate) fn assign(
    shards: &[u32],
    candidates: impl Fn(u32) -> Vec<String>,
    excluded: impl Fn(&str) -> bool,
    available: impl Fn(&str) -> bool,
    seed: u64,
) -> Result<BTreeMap<String, Vec<u32>>, u32> {
    let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for &shard in shards {
        let cands: Vec<String> = candidates(shard)
            .into_iter()
            .filter(|n| !excluded(n))
            .collect();
        let healthy = cands.iter().filter(|n| available(n));
        let pick = healthy
            .min_by_key(|n| rank(seed, n))
            .or_else(|| cands.iter().min_by_key(|n| rank(seed, n)))
            .ok_or(shard)?;
        groups.entry(pick.clone()).or_default().push(shard);
    }
    Ok(groups)
}

/// Puts the answers' rows back into the caller's key order, one [`Rows`] per table.
///
/// Fails (with the reason) when answers disagree on the version or a table's dim, or when an
/// answer does not match what was asked: such rows must never reach the caller.
pub(crate) fn merge(lens: &[usize], answers: &[Answer]) -> Result<Vec<Rows>, String> {
    let Some(first) = answers.first() else {
        return Err("no answer to merge".into());
    };
    let version = first.version;
    let mut out: Vec<Rows> = Vec::with_capacity(lens.len());
    for (t, &len) in lens.iter().enumerate() {
        let Some(dim) = first.rows.get(t).map(|r| r.dim) else {
            return Err(format!("node {} sent no rows for table #{t}", first.node));
        };
        let d = dim as usize;
        // What the nodes sent bounds what is allocated: a node answering a wrong (huge) dim
        // gets an error, not an allocation of its choosing.
        let sent: usize = answers
            .iter()
            .filter_map(|a| a.rows.get(t))
            .map(|r| r.values.len())
            .sum();
        let Some(total) = len.checked_mul(d).filter(|&n| n <= sent) else {
            return Err(format!(
                "node {} answered rows of dim {dim} for {len} keys, but the answers hold {sent}                  values",
                first.node
            ));
        };
        let mut rows = Rows {
            version,
            dim,
            values: vec![0.0; total],
            found: vec![false; len],
        };
        for a in answers {
            if a.version != version {
                return Err(format!(
                    "node {} answered at version {}, node {} at version {version}",
                    a.node, a.version, first.node
                ));
            }
            let (Some(part), Some(r)) = (a.parts.get(t), a.rows.get(t)) else {
                return Err(format!("node {} sent no rows for table #{t}", a.node));
            };
            if r.dim != dim {
                return Err(format!(
                    "node {} answered rows of dim {}, node {} of dim {dim}",
                    a.node, r.dim, first.node
                ));
            }
            if r.found.len() != part.positions.len() || r.values.len() != part.positions.len() * d {
                return Err(format!(
                    "node {} answered {} rows for {} keys",
                    a.node,
                    r.found.len(),
                    part.positions.len()
                ));
            }
            for (j, &pos) in part.positions.iter().enumerate() {
                let (Some(dst), Some(src)) = (
                    rows.values.get_mut(pos * d..(pos + 1) * d),
                    r.values.get(j * d..(j + 1) * d),
                ) else {
                    return Err(format!("position {pos} is out of range"));
                };
                dst.copy_from_slice(src);
                rows.found[pos] = r.found[j];
            }
        }
        out.push(rows);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_for(keys: &[u64], version: u64) -> Rows {
        Rows {
            version,
            dim: 2,
            values: keys.iter().flat_map(|&k| [k as f32, -(k as f32)]).collect(),
            found: keys.iter().map(|k| k % 3 != 0).collect(),
        }
    }

    #[test]
    fn a_huge_dim_from_a_node_is_an_error_not_an_allocation() {
        let keys: Vec<u64> = (0..4).collect();
        let split = Split::new(&[&keys], 1);
        let parts = split.parts.values().next().expect("one shard").clone();
        let answer = Answer {
            node: "bad".into(),
            version: 1,
            parts,
            rows: vec![Rows {
                version: 1,
                dim: u32::MAX,
                values: vec![0.0; 8],
                found: vec![true; 4],
            }],
        };
        let err = merge(&[keys.len()], &[answer]).expect_err("rejected");
        assert!(err.contains("bad") && err.contains("dim"), "{err}");
    }

    #[test]
    fn split_groups_by_shard_and_merge_restores_order() {
        let keys: Vec<u64> = (0..200).rev().collect();
        let other: Vec<u64> = vec![7, 7, 1000];
        let split = Split::new(&[&keys, &other], 8);
        for (&s, parts) in &split.parts {
            for p in parts {
                assert!(p.keys.iter().all(|&k| hopps_format::shard_of(k, 8) == s));
            }
        }
        // Two nodes, shards split between them.
        let shards = split.shards();
        let (a, b) = shards.split_at(shards.len() / 2);
        let answers: Vec<Answer> = [("n1", a), ("n2", b)]
            .iter()
            .map(|(node, shards)| {
                let parts = split.gather(shards);
                let rows = parts.iter().map(|p| rows_for(&p.keys, 5)).collect();
                Answer {
                    node: node.to_string(),
                    version: 5,
                    parts,
                    rows,
                }
            })
            .collect();
        let merged = merge(&split.lens, &answers).unwrap();
        assert_eq!(merged[0], rows_for(&keys, 5));
        assert_eq!(merged[1], rows_for(&other, 5));
    }

    #[test]
    fn merge_refuses_mixed_versions_and_dims() {
        let split = Split::new(&[&[1, 2, 3, 4, 5, 6, 7, 8]], 4);
        let shards = split.shards();
        assert!(shards.len() >= 2);
        let answers: Vec<Answer> = shards
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let parts = split.gather(&[s]);
                Answer {
                    node: format!("n{i}"),
                    version: 3 + (i as u64 % 2),
                    rows: vec![rows_for(&parts[0].keys, 3 + (i as u64 % 2))],
                    parts,
                }
            })
            .collect();
        let err = merge(&split.lens, &answers).unwrap_err();
        assert!(err.contains("version"), "{err}");
        let mut same = answers.clone();
        for a in &mut same {
            a.version = 3;
            a.rows[0].version = 3;
        }
        assert!(merge(&split.lens, &same).is_ok());
        same[1].rows[0].dim = 4;
        assert!(merge(&split.lens, &same).unwrap_err().contains("dim"));
    }

    #[test]
    fn no_keys_still_asks_one_shard() {
        let split = Split::new(&[&[]], 16);
        assert_eq!(split.shards(), vec![0]);
        let parts = split.gather(&[0]);
        let a = Answer {
            node: "n".into(),
            version: 1,
            rows: vec![rows_for(&[], 1)],
            parts,
        };
        let merged = merge(&split.lens, &[a]).unwrap();
        assert!(merged[0].is_empty());
        assert_eq!(merged[0].dim, 2);
    }

    #[test]
    fn assign_skips_tried_prefers_closed_breakers_and_spreads() {
        let cands = |s: u32| -> Vec<String> {
            match s {
                0 => vec!["a".into(), "b".into()],
                1 => vec!["b".into(), "c".into()],
                _ => vec!["c".into()],
            }
        };
        // Tried nodes are never chosen; a shard with no one left is reported.
        let g = assign(&[0, 1, 2], cands, |n| n == "b", |_| true, 1).unwrap();
        assert_eq!(g.get("a"), Some(&vec![0]));
        assert_eq!(g.get("c"), Some(&vec![1, 2]));
        assert_eq!(assign(&[0, 2], cands, |n| n == "c", |_| true, 1), Err(2));
        // An open breaker is avoided while another replica is available ...
        for seed in 0..50 {
            let g = assign(&[0, 1], cands, |_| false, |n| n != "b", seed).unwrap();
            assert!(!g.contains_key("b"), "{g:?}");
        }
        // ... and used when it is the only one.
        let g = assign(&[2], cands, |_| false, |n| n != "c", 0).unwrap();
        assert_eq!(g.get("c"), Some(&vec![2]));
        // Across requests, both replicas of shard 0 get traffic.
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let g = assign(&[0], cands, |_| false, |_| true, seed).unwrap();
            seen.extend(g.into_keys());
        }
        assert_eq!(seen.len(), 2);
        // Within one request, shards held by the same nodes go to one node: one RPC.
        let same = |_: u32| vec!["a".to_string(), "b".to_string()];
        for seed in 0..20 {
            let g = assign(&[0, 1, 2, 3], same, |_| false, |_| true, seed).unwrap();
            assert_eq!(g.len(), 1);
        }
    }
}
