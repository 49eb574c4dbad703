//! The partitions a shard owns, by topic and then by partition index. A Fetch or Produce names a
//! topic once and then many of its partitions: looking a partition up is a hash of the topic name
//! once per run of its partitions and an index after that, not a hash of the name per partition
//! (at 1,000 partitions a consumer's Fetch looks up every partition it reads, hundreds of times
//! a second).

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{PartitionHasher, PartitionId, TopicPartition};

/// One topic's partitions on this shard, indexed by partition id (the others are `None`).
pub type TopicLogs<V> = [Option<V>];

/// Values (a shard's partition logs) by partition.
pub struct OwnedPartitions<V> {
    topics: HashMap<Arc<str>, Vec<Option<V>>, PartitionHasher>,
    len: usize,
}

impl<V> Default for OwnedPartitions<V> {
    fn default() -> Self {
        OwnedPartitions {
            topics: HashMap::default(),
            len: 0,
        }
    }
}

impl<V> OwnedPartitions<V> {
    pub fn get(&self, tp: &TopicPartition) -> Option<&V> {
        Self::in_topic(self.topic(&tp.topic)?, tp.partition)
    }

    /// A topic's partitions here: look a topic up once, then each partition with [`Self::in_topic`].
    pub fn topic(&self, topic: &str) -> Option<&TopicLogs<V>> {
        self.topics.get(topic).map(Vec::as_slice)
    }

    pub fn in_topic(logs: &TopicLogs<V>, partition: PartitionId) -> Option<&V> {
        let index = usize::try_from(partition.0).ok()?;
        logs.get(index)?.as_ref()
    }

    pub fn contains_key(&self, tp: &TopicPartition) -> bool {
        self.get(tp).is_some()
    }

    pub fn insert(&mut self, tp: TopicPartition, log: V) {
        let Ok(index) = usize::try_from(tp.partition.0) else {
            return;
        };
        let logs = self.topics.entry(tp.topic).or_default();
        if logs.len() <= index {
            logs.resize_with(index + 1, || None);
        }
        if logs[index].replace(log).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, tp: &TopicPartition) -> Option<V> {
        let index = usize::try_from(tp.partition.0).ok()?;
        let logs = self.topics.get_mut(&*tp.topic)?;
        let removed = logs.get_mut(index)?.take()?;
        self.len -= 1;
        while logs.last().is_some_and(Option::is_none) {
            logs.pop();
        }
        if logs.is_empty() {
            self.topics.remove(&*tp.topic);
        }
        Some(removed)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (TopicPartition, &V)> {
        self.topics.iter().flat_map(|(topic, logs)| {
            logs.iter().enumerate().filter_map(move |(index, log)| {
                let log = log.as_ref()?;
                let partition = PartitionId(i32::try_from(index).ok()?);
                let tp = TopicPartition {
                    topic: topic.clone(),
                    partition,
                };
                Some((tp, log))
            })
        })
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.topics.values().flatten().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_found_by_topic_and_index_and_counted() {
        let mut owned = OwnedPartitions::default();
        owned.insert(TopicPartition::new("a", 4), 40);
        owned.insert(TopicPartition::new("a", 0), 0);
        owned.insert(TopicPartition::new("b", 1), 11);
        owned.insert(TopicPartition::new("a", 4), 44); // replaced, not counted twice
        assert_eq!(owned.len(), 3);
        assert_eq!(owned.get(&TopicPartition::new("a", 4)), Some(&44));
        assert_eq!(owned.get(&TopicPartition::new("a", 2)), None);
        assert_eq!(owned.get(&TopicPartition::new("a", 9)), None);
        assert_eq!(owned.get(&TopicPartition::new("a", -1)), None);
        assert_eq!(owned.get(&TopicPartition::new("c", 0)), None);
        let a = owned.topic("a").unwrap();
        assert_eq!(OwnedPartitions::in_topic(a, PartitionId(0)), Some(&0));
        let mut all: Vec<_> = owned.iter().map(|(tp, v)| (tp.to_string(), *v)).collect();
        all.sort();
        assert_eq!(
            all,
            [
                ("a-0".to_string(), 0),
                ("a-4".into(), 44),
                ("b-1".into(), 11)
            ]
        );
        assert_eq!(owned.remove(&TopicPartition::new("a", 4)), Some(44));
        assert_eq!(owned.remove(&TopicPartition::new("a", 4)), None);
        assert_eq!(owned.remove(&TopicPartition::new("b", 1)), Some(11));
        assert_eq!(owned.len(), 1);
        assert!(
            owned.topic("b").is_none(),
            "a topic with no partitions left is dropped"
        );
        assert_eq!(owned.values().copied().collect::<Vec<_>>(), [0]);
        assert_eq!(owned.remove(&TopicPartition::new("a", 0)), Some(0));
        assert!(owned.is_empty() && owned.topic("a").is_none());
    }
}
