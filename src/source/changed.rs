//! Changed columns: which columns of a row an update changed, as the stream showed them, for
//! the body's `previous` and for routing that filters on columns.
//!
//! What must hold: a set exists only when the old row is known (an update whose old image is
//! the whole row, REPLICA IDENTITY FULL), so "not in the set" means "did not change", never
//! "unknown"; a column is in the set only when its new value differs from its old one (raw
//! text bytes, NULL against a value); an unchanged large (TOASTed) value is never in it;
//! names come in relation (table) order; the column names are shared per relation, so a set
//! costs one small bitset per update.

use std::sync::Arc;

/// Which columns of a row an update changed, as the stream showed them (old row known).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedColumns {
    /// The relation's column names, in relation order (shared by every change of it).
    names: Arc<[String]>,
    /// Bit `i` set: column `i` changed.
    bits: Vec<u64>,
}

// Until routing filters on changed columns (issue 20), only `decode` and tests use the set.
impl ChangedColumns {
    /// A set over the relation's column `names` (relation order) in which nothing changed yet.
    pub fn new(names: Arc<[String]>) -> Self {
        let bits = vec![0; names.len().div_ceil(64)];
        ChangedColumns { names, bits }
    }

    /// Records that column `index` (relation order) changed; an index past the relation's
    /// columns is ignored.
    pub fn mark(&mut self, index: usize) {
        if index < self.names.len() {
            if let Some(word) = self.bits.get_mut(index / 64) {
                *word |= 1 << (index % 64);
            }
        }
    }

    /// Whether `column` changed.
    pub fn contains(&self, column: &str) -> bool {
        self.names.iter().position(|n| n == column).is_some_and(|i| self.is_marked(i))
    }

    /// Whether the relation has a column named `column` (changed or not).
    pub fn knows(&self, column: &str) -> bool {
        self.names.iter().any(|n| n == column)
    }

    /// Whether any of `columns` changed.
    pub fn any_of<S: AsRef<str>>(&self, columns: &[S]) -> bool {
        columns.iter().any(|c| self.contains(c.as_ref()))
    }

    /// The changed columns' names, in relation order.
    #[cfg(test)]
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().enumerate().filter(|(i, _)| self.is_marked(*i)).map(|(_, n)| n.as_str())
    }

    /// Whether no column changed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Whether column `index` (relation order) changed.
    pub(crate) fn is_marked(&self, index: usize) -> bool {
        self.bits.get(index / 64).is_some_and(|w| w & (1 << (index % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Arc<[String]> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn a_new_set_holds_nothing() {
        let set = ChangedColumns::new(names(3));
        assert!(set.is_empty());
        assert!(!set.contains("c0"));
        assert!(!set.any_of(&["c0", "c1", "c2"]));
        assert_eq!(set.names().count(), 0);
        assert!(ChangedColumns::new(names(0)).is_empty());
    }

    #[test]
    fn marked_columns_are_named_in_relation_order() {
        let mut set = ChangedColumns::new(names(4));
        set.mark(3);
        set.mark(1);
        set.mark(1);
        assert!(!set.is_empty());
        assert_eq!(set.names().collect::<Vec<_>>(), ["c1", "c3"]);
        assert!(set.contains("c1") && set.contains("c3"));
        assert!(!set.contains("c0") && !set.contains("c2"));
        assert!(!set.contains("nope"), "a column the relation lacks never changed");
        assert!(set.any_of(&["c0", "c3"]));
        assert!(set.any_of(&[String::from("c1")]));
        assert!(!set.any_of(&["c0", "c2", "nope"]));
        assert!(!set.any_of::<&str>(&[]));
    }

    #[test]
    fn wide_tables_use_more_than_one_word() {
        let mut set = ChangedColumns::new(names(130));
        set.mark(0);
        set.mark(64);
        set.mark(129);
        set.mark(130); // past the relation: ignored
        assert_eq!(set.names().collect::<Vec<_>>(), ["c0", "c64", "c129"]);
        assert!(!set.contains("c63") && !set.contains("c128"));
    }

    #[test]
    fn sets_compare_by_their_columns_and_marks() {
        let shared = names(3);
        let (mut a, mut b) = (ChangedColumns::new(shared.clone()), ChangedColumns::new(shared));
        a.mark(2);
        assert_ne!(a, b);
        b.mark(2);
        assert_eq!(a, b);
    }
}
