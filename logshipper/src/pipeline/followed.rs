//! The files being followed (found, not shipped yet), counted per source, so that a source
//! can be held back at its share without counting the whole map each time.

use std::collections::HashMap;

/// (source id, path relative to the source root)
pub(super) type FileId = (String, String);

pub(super) struct Followed<E> {
    entries: HashMap<FileId, E>,
    per_source: HashMap<String, usize>,
}

impl<E> Followed<E> {
    pub(super) fn new() -> Self {
        Self {
            entries: HashMap::new(),
            per_source: HashMap::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Files followed in `source`.
    pub(super) fn count(&self, source: &str) -> usize {
        self.per_source.get(source).copied().unwrap_or(0)
    }

    /// Sources with at least one file followed.
    pub(super) fn sources(&self) -> usize {
        self.per_source.len()
    }

    pub(super) fn get(&self, id: &FileId) -> Option<&E> {
        self.entries.get(id)
    }

    pub(super) fn get_mut(&mut self, id: &FileId) -> Option<&mut E> {
        self.entries.get_mut(id)
    }

    pub(super) fn contains_key(&self, id: &FileId) -> bool {
        self.entries.contains_key(id)
    }

    pub(super) fn insert(&mut self, id: FileId, entry: E) {
        let source = id.0.clone();
        if self.entries.insert(id, entry).is_none() {
            *self.per_source.entry(source).or_default() += 1;
        }
    }

    pub(super) fn remove(&mut self, id: &FileId) -> Option<E> {
        let entry = self.entries.remove(id)?;
        self.uncount(&id.0, 1);
        Some(entry)
    }

    /// Drops `source`'s files for which `keep` is false.
    pub(super) fn retain_source(&mut self, source: &str, mut keep: impl FnMut(&E) -> bool) {
        if self.count(source) == 0 {
            return;
        }
        let before = self.entries.len();
        self.entries.retain(|(id, _), e| id != source || keep(e));
        self.uncount(source, before - self.entries.len());
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &E> {
        self.entries.values()
    }

    fn uncount(&mut self, source: &str, files: usize) {
        if let Some(count) = self.per_source.get_mut(source) {
            *count -= files.min(*count);
            if *count == 0 {
                self.per_source.remove(source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(source: &str, file: &str) -> FileId {
        (source.into(), file.into())
    }

    #[test]
    fn counts_follow_inserts_removals_and_retains() {
        let mut followed = Followed::new();
        followed.insert(id("a", "1"), 1);
        followed.insert(id("a", "2"), 2);
        followed.insert(id("a", "2"), 3);
        followed.insert(id("b", "1"), 4);
        assert_eq!((followed.count("a"), followed.count("b")), (2, 1));
        assert_eq!(followed.sources(), 2);
        assert_eq!(followed.remove(&id("a", "1")), Some(1));
        assert_eq!(followed.remove(&id("a", "1")), None);
        assert_eq!(followed.count("a"), 1);
        followed.retain_source("b", |e| *e != 4);
        assert_eq!((followed.count("b"), followed.sources()), (0, 1));
        followed.retain_source("a", |_| true);
        assert_eq!((followed.count("a"), followed.len()), (1, 1));
    }
}
