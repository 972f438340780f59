//! Routing a topic to the rules whose filters match it, without testing
//! every filter: a trie over topic levels with `+` and `#` children.
//!
//! The index agrees exactly with [`TopicFilter::matches`] (MQTT 3.1.1
//! §4.7): `+` is one level, `#` is the rest including the parent level
//! (`a/#` matches `a`), empty levels are levels, and wildcards in the first
//! level never match a topic that starts with `$`.
//!
//! Matching a topic costs one child lookup per topic level per live branch
//! (a literal child and a `+` child can both continue), so it depends on
//! the topic's depth and on how the filters overlap, not on their number.
//! Nodes live in one arena and refer to each other by index, so neither
//! building, matching nor dropping recurses, however deep a filter is.

use crate::topic::TopicFilter;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Children by literal level: a short list is scanned (cheaper than
/// hashing a handful of keys), a long one is a hash map.
const SCAN_UP_TO: usize = 8;

#[derive(Debug, Default)]
struct Node {
    /// Filters built while adding; frozen into `literal` by [`FilterIndex::new`].
    building: HashMap<Box<str>, u32>,
    literal: Children,
    /// The `+` child.
    plus: Option<u32>,
    /// Filters ending in `#` right below this node: they match a topic that
    /// reaches this node, whatever (if anything) follows.
    hash: Vec<usize>,
    /// Filters that end at this node: they match a topic that ends here.
    exact: Vec<usize>,
}

#[derive(Debug, Default)]
enum Children {
    #[default]
    None,
    Few(Vec<(Box<str>, u32)>),
    Many(HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>),
}

impl Children {
    fn get(&self, level: &str) -> Option<u32> {
        match self {
            Children::None => None,
            Children::Few(list) => list
                .iter()
                .find(|(name, _)| &**name == level)
                .map(|&(_, i)| i),
            Children::Many(map) => map.get(level).copied(),
        }
    }
}

/// FNV-1a: levels are short, so a simple byte hash beats SipHash. Only
/// filters (written by whoever deploys rules) are inserted; a device's
/// topic is only looked up, so it cannot flood a map.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// An index of topic filters; filter `i` is the `i`-th one given to
/// [`FilterIndex::new`].
#[derive(Debug)]
pub struct FilterIndex {
    nodes: Vec<Node>,
    filters: usize,
}

const ROOT: u32 = 0;

impl FilterIndex {
    pub fn new<'a>(filters: impl IntoIterator<Item = &'a TopicFilter>) -> Self {
        let mut nodes = vec![Node::default()];
        let mut count = 0;
        for (i, filter) in filters.into_iter().enumerate() {
            count = i + 1;
            let mut node = ROOT;
            let mut levels = filter.as_str().split('/').peekable();
            while let Some(level) = levels.next() {
                if level == "#" {
                    // A valid filter has `#` only as its last level.
                    debug_assert!(levels.peek().is_none());
                    nodes[node as usize].hash.push(i);
                    break;
                }
                let next = nodes.len() as u32;
                let child = if level == "+" {
                    *nodes[node as usize].plus.get_or_insert(next)
                } else {
                    *nodes[node as usize]
                        .building
                        .entry(level.into())
                        .or_insert(next)
                };
                if child == next {
                    nodes.push(Node::default());
                }
                node = child;
                if levels.peek().is_none() {
                    nodes[node as usize].exact.push(i);
                }
            }
        }
        for node in &mut nodes {
            let building = std::mem::take(&mut node.building);
            node.literal = match building.len() {
                0 => Children::None,
                n if n <= SCAN_UP_TO => Children::Few(building.into_iter().collect()),
                _ => Children::Many(building.into_iter().collect()),
            };
        }
        Self {
            nodes,
            filters: count,
        }
    }

    /// Number of filters indexed.
    pub fn len(&self) -> usize {
        self.filters
    }

    pub fn is_empty(&self) -> bool {
        self.filters == 0
    }

    /// Appends the indices of every filter matching `topic`, ascending, no duplicates.
    pub fn matches(&self, topic: &str, out: &mut Vec<usize>) {
        let start = out.len();
        // A filter is one path through the trie and a topic follows a
        // filter's path in one way only, so no index is reached twice.
        //
        // `rest`: the levels still to match (`Some("")` is one empty
        // level; `None`, none left). Branches not taken yet wait on the
        // stack, which is only allocated when a topic meets both a literal
        // and a `+` child.
        let mut stack: Vec<(u32, Option<&str>)> = Vec::new();
        let system = topic.starts_with('$');
        let (mut node, mut rest) = (ROOT, Some(topic));
        loop {
            let n = &self.nodes[node as usize];
            // MQTT 3.1.1 §4.7.2: `#` and `+` in the first level do not match `$` topics.
            let wildcards = !(system && node == ROOT);
            if wildcards {
                out.extend_from_slice(&n.hash);
            }
            let next = match rest {
                None => {
                    out.extend_from_slice(&n.exact);
                    None
                }
                Some(levels) => {
                    let (level, after) = match levels.split_once('/') {
                        Some((level, after)) => (level, Some(after)),
                        None => (levels, None),
                    };
                    let plus = n.plus.filter(|_| wildcards);
                    match (n.literal.get(level), plus) {
                        (Some(l), Some(p)) => {
                            stack.push((p, after));
                            Some((l, after))
                        }
                        (Some(c), None) | (None, Some(c)) => Some((c, after)),
                        (None, None) => None,
                    }
                }
            };
            match next.or_else(|| stack.pop()) {
                Some((n, r)) => (node, rest) = (n, r),
                None => break,
            }
        }
        out[start..].sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(filters: &[&str]) -> (FilterIndex, Vec<TopicFilter>) {
        let filters: Vec<TopicFilter> = filters
            .iter()
            .map(|f| TopicFilter::new(f).unwrap())
            .collect();
        (FilterIndex::new(&filters), filters)
    }

    fn routed(index: &FilterIndex, topic: &str) -> Vec<usize> {
        let mut out = Vec::new();
        index.matches(topic, &mut out);
        out
    }

    fn brute_force(filters: &[TopicFilter], topic: &str) -> Vec<usize> {
        (0..filters.len())
            .filter(|&i| filters[i].matches(topic))
            .collect()
    }

    #[test]
    fn wildcards_route_as_the_spec_says() {
        let (ix, _) = index(&[
            "devices/+/telemetry",  // 0
            "devices/#",            // 1
            "#",                    // 2
            "+/x",                  // 3
            "$SYS/#",               // 4
            "a/+",                  // 5
            "a/b",                  // 6
            "a/b/c",                // 7
            "devices/d1/telemetry", // 8
        ]);
        assert_eq!(routed(&ix, "devices/d1/telemetry"), [0, 1, 2, 8]);
        assert_eq!(routed(&ix, "devices/d1/x/telemetry"), [1, 2]);
        assert_eq!(routed(&ix, "devices"), [1, 2]);
        assert_eq!(routed(&ix, "$SYS/x"), [4]);
        assert_eq!(routed(&ix, "$SYS"), [4]);
        assert_eq!(routed(&ix, "a/"), [2, 5]);
        assert_eq!(routed(&ix, "a/b"), [2, 5, 6]);
        assert_eq!(routed(&ix, "a/b/c"), [2, 7]);
        assert_eq!(routed(&ix, "z/x"), [2, 3]);
    }

    #[test]
    fn empty_levels_are_levels() {
        let (ix, _) = index(&["/", "+", "+/+", "/#", "+/#", "a//b", "a/+/b"]);
        // `#` includes the parent level, so `/#` matches the one empty level of "".
        assert_eq!(routed(&ix, ""), [1, 3, 4]);
        assert_eq!(routed(&ix, "/"), [0, 2, 3, 4]);
        assert_eq!(routed(&ix, "//"), [3, 4]);
        assert_eq!(routed(&ix, "a//b"), [4, 5, 6]);
    }

    #[test]
    fn duplicate_filters_each_match_and_come_out_ascending() {
        let (ix, _) = index(&["a/#", "+/b", "a/b", "a/#", "#", "a/b"]);
        assert_eq!(routed(&ix, "a/b"), [0, 1, 2, 3, 4, 5]);
        let mut out = vec![99];
        ix.matches("a", &mut out);
        assert_eq!(out, [99, 0, 3, 4], "appends after what is there");
        assert_eq!(ix.len(), 6);
    }

    #[test]
    fn an_empty_index_matches_nothing() {
        let ix = FilterIndex::new(&[]);
        assert!(ix.is_empty());
        assert_eq!(routed(&ix, "a/b"), Vec::<usize>::new());
    }

    #[test]
    fn many_children_use_the_map_and_agree() {
        let names: Vec<String> = (0..100).map(|i| format!("devices/+/s{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (ix, filters) = index(&refs);
        for i in [0, 7, 8, 9, 42, 99] {
            assert_eq!(routed(&ix, &format!("devices/d{i}/s{i}")), [i]);
        }
        assert_eq!(routed(&ix, "devices/d/s100"), Vec::<usize>::new());
        assert_eq!(
            routed(&ix, "devices/s1"),
            brute_force(&filters, "devices/s1")
        );
    }

    #[test]
    fn very_deep_filters_neither_recurse_nor_overflow() {
        let deep = vec!["a"; 100_000].join("/");
        let (ix, _) = index(&[deep.as_str(), "#"]);
        assert_eq!(routed(&ix, &deep), [0, 1]);
        assert_eq!(routed(&ix, &format!("{deep}/a")), [1]);
    }

    /// Every filter of up to three levels over a small alphabet against every
    /// topic of up to three levels: all agree with `TopicFilter::matches`.
    #[test]
    fn agrees_with_topic_filter_exhaustively_on_short_filters() {
        let filter_levels = ["a", "b", "", "$s", "+", "#"];
        let topic_levels = ["a", "b", "", "$s", "c"];
        let mut filters = Vec::new();
        for len in 1..=3 {
            for combo in product(&filter_levels, len) {
                if let Ok(f) = TopicFilter::new(&combo.join("/")) {
                    filters.push(f);
                }
            }
        }
        let ix = FilterIndex::new(&filters);
        let mut checked = 0;
        for len in 1..=4 {
            for combo in product(&topic_levels, len) {
                let topic = combo.join("/");
                assert_eq!(
                    routed(&ix, &topic),
                    brute_force(&filters, &topic),
                    "{topic:?}"
                );
                checked += 1;
            }
        }
        // 5 + 30 + 150 valid filters; 5 + 25 + 125 + 625 topics.
        assert_eq!((filters.len(), checked), (185, 780));
    }

    fn product<'a>(alphabet: &[&'a str], len: usize) -> Vec<Vec<&'a str>> {
        let mut out = vec![Vec::new()];
        for _ in 0..len {
            out = out
                .into_iter()
                .flat_map(|prefix| {
                    alphabet.iter().map(move |l| {
                        let mut v = prefix.clone();
                        v.push(*l);
                        v
                    })
                })
                .collect();
        }
        out
    }

    /// xorshift64*: deterministic, good enough to shake out routing bugs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    /// Random filter sets (duplicates, overlaps, deep filters, `$` levels)
    /// against random topics, compared with `TopicFilter::matches`.
    #[test]
    fn agrees_with_topic_filter_on_random_filters_and_topics() {
        let literals = [
            "a",
            "b",
            "c",
            "",
            "$SYS",
            "$x",
            "dev",
            "d1",
            "telemetry",
            "aa",
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0usize;
        let mut matched = 0usize;
        for round in 0..200 {
            let mut filters = Vec::new();
            for _ in 0..1 + rng.below(60) {
                let depth = 1 + rng.below(6);
                let mut levels: Vec<&str> = (0..depth)
                    .map(|_| match rng.below(10) {
                        0..=1 => "+",
                        _ => rng.pick(&literals),
                    })
                    .collect();
                if rng.below(4) == 0 {
                    levels.push("#");
                }
                // A lone empty level is the one invalid filter this can make.
                let filter = TopicFilter::new(&levels.join("/"))
                    .unwrap_or_else(|_| TopicFilter::new("+").unwrap());
                filters.push(filter);
                if rng.below(10) == 0 {
                    // A duplicate of an earlier filter.
                    let earlier = filters[rng.below(filters.len())].clone();
                    filters.push(earlier);
                }
            }
            let ix = FilterIndex::new(&filters);
            let mut out = vec![usize::MAX];
            for _ in 0..100 {
                let topic = if rng.below(3) == 0 {
                    // A topic made from a filter, so that deep matches happen.
                    let f = filters[rng.below(filters.len())].as_str();
                    f.split('/')
                        .flat_map(|l| match l {
                            "+" => vec![rng.pick(&literals)],
                            "#" => (0..rng.below(3)).map(|_| rng.pick(&literals)).collect(),
                            l => vec![l],
                        })
                        .collect::<Vec<_>>()
                        .join("/")
                } else {
                    let depth = 1 + rng.below(7);
                    (0..depth)
                        .map(|_| rng.pick(&literals))
                        .collect::<Vec<_>>()
                        .join("/")
                };
                let want = brute_force(&filters, &topic);
                out.truncate(1);
                ix.matches(&topic, &mut out);
                assert_eq!(
                    out[1..],
                    want[..],
                    "round {round}: {topic:?} in {filters:?}"
                );
                assert_eq!(out[0], usize::MAX);
                compared += 1;
                matched += want.len();
            }
        }
        assert_eq!(compared, 20_000);
        assert!(
            matched > 10_000,
            "the generator should produce matches: {matched}"
        );
    }
}
