//! A map kept as a vector sorted by key.
//!
//! Why not `BTreeMap`: its code is about 17 KB of the npm package's wasm (which has a size goal)
//! and of the Envoy filter, and the maps here do not need it. The configuration's model maps hold
//! a handful of names, and the engine's requests are inserted in key order (request ids only
//! rise), so an insert is a push and a lookup a binary search; a removal moves the entries after
//! it, which is why the engine boxes its request states (16 bytes an entry to move).
//!
//! [`sort_by`] is the crate's one sort, for the same reason: `slice::sort_unstable` (ipnsort) is
//! about 3 KB of wasm for every element type it sorts.

use alloc::vec::Vec;
use core::borrow::Borrow;

/// A map whose entries are a vector sorted by key, iterated in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortedMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, V> SortedMap<K, V> {
    /// An empty map.
    pub const fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> core::slice::Iter<'_, (K, V)> {
        self.entries.iter()
    }

    /// The keys in order.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }

    /// The values in key order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        // Keys inserted in order make the last entry the likeliest target of a new insert.
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    /// The value for a key.
    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        let at = self.find(key).ok()?;
        self.entries.get(at).map(|(_, v)| v)
    }

    /// The value for a key, to change.
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        let at = self.find(key).ok()?;
        self.entries.get_mut(at).map(|(_, v)| v)
    }

    /// Sets a key's value; returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        if self.entries.last().is_none_or(|(last, _)| *last < key) {
            self.entries.push((key, value));
            return None;
        }
        match self.find(&key) {
            Ok(at) => self
                .entries
                .get_mut(at)
                .map(|slot| core::mem::replace(&mut slot.1, value)),
            Err(at) => {
                self.entries.insert(at, (key, value));
                None
            }
        }
    }

    /// Takes a key's entry out; returns its value.
    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let at = self.find(key).ok()?;
        Some(self.entries.remove(at).1)
    }
}

/// Sorts `v` by `less` (a strict order), unstably: a heapsort, O(n log n) without allocating, in
/// a fraction of `slice::sort_unstable`'s code. Only the order of equal elements can differ from
/// `sort_unstable_by`'s, and no caller keeps equal elements apart: the engine sorts request ids
/// and then dedups them, the cache key refuses an object with a repeated member.
pub fn sort_by<T>(v: &mut [T], mut less: impl FnMut(&T, &T) -> bool) {
    let mut lt = |v: &[T], a: usize, b: usize| match (v.get(a), v.get(b)) {
        (Some(x), Some(y)) => less(x, y),
        _ => false,
    };
    // Moves the element at `node` down the max-heap in `v[..end]` to its place.
    let mut sift_down = |v: &mut [T], mut node: usize, end: usize| loop {
        let mut child = 2 * node + 1;
        if child >= end {
            break;
        }
        if child + 1 < end && lt(v, child, child + 1) {
            child += 1;
        }
        if !lt(v, node, child) {
            break;
        }
        v.swap(node, child);
        node = child;
    };
    let len = v.len();
    for node in (0..len / 2).rev() {
        sift_down(v, node, len);
    }
    for end in (1..len).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(items: I) -> Self {
        let mut map = Self::new();
        for (k, v) in items {
            map.insert(k, v);
        }
        map
    }
}

impl<'a, K, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = &'a (K, V);
    type IntoIter = core::slice::Iter<'a, (K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;

    /// Random inserts, replacements, lookups and removals agree with `BTreeMap`.
    #[test]
    fn behaves_like_a_btree_map() {
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..200 {
            let (mut ours, mut theirs) = (SortedMap::new(), BTreeMap::new());
            let range = rng.u32(1..64);
            for step in 0..300u32 {
                let key = rng.u32(..range);
                match rng.u8(..4) {
                    0 | 1 => assert_eq!(ours.insert(key, step), theirs.insert(key, step)),
                    2 => assert_eq!(ours.remove(&key), theirs.remove(&key)),
                    _ => assert_eq!(ours.get(&key), theirs.get(&key)),
                }
                assert_eq!(ours.len(), theirs.len());
            }
            let ours: Vec<_> = ours.iter().map(|&(k, v)| (k, v)).collect();
            let theirs: Vec<_> = theirs.into_iter().collect();
            assert_eq!(ours, theirs);
        }
    }

    /// Sorts every length from 0 to 40, with and without repeats, as `sort_unstable` does.
    #[test]
    fn sort_by_sorts_like_the_standard_sort() {
        let mut rng = fastrand::Rng::with_seed(13);
        for len in 0..=40 {
            for range in [2, 8, u32::MAX] {
                for _ in 0..20 {
                    let mut ours: Vec<u32> = (0..len).map(|_| rng.u32(..range)).collect();
                    let mut theirs = ours.clone();
                    sort_by(&mut ours, |a, b| a < b);
                    theirs.sort_unstable();
                    assert_eq!(ours, theirs);
                }
            }
        }
        let mut descending: Vec<u64> = (0..1000).collect();
        sort_by(&mut descending, |a, b| a > b);
        assert!(descending.windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn string_keys_are_found_by_str() {
        let map: SortedMap<alloc::string::String, u8> =
            [("b".into(), 2), ("a".into(), 1)].into_iter().collect();
        assert_eq!(map.get("a"), Some(&1));
        assert_eq!(
            map.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}
