//! Runs rules on several cores at once while keeping each device's order.
//!
//! A batch is split into shards by device (the topic stands in for messages
//! without one), each shard goes to its own [`Processor`], and the shards run
//! in parallel on a small rayon pool. A device always lands in the same
//! shard, and a batch is finished before the next begins, so a device's
//! messages reach every rule in the order the broker accepted them. The
//! processors keep their WASM instances between batches; instances are not
//! tied to a thread, so any pool thread may run any shard.

use crate::processor::{Processor, ProcessorConfig, RuleContext};
use crate::{Message, Output, RuleSet};
use arc_swap::ArcSwap;
use rayon::prelude::*;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;

pub struct ParallelProcessor {
    shards: Vec<Processor>,
    pool: Option<rayon::ThreadPool>,
}

impl ParallelProcessor {
    /// `workers` processors (at least one); with one, no thread pool is made
    /// and batches run on the caller's thread.
    pub fn new(
        rules: Arc<ArcSwap<RuleSet>>,
        config: ProcessorConfig,
        context: RuleContext,
        workers: usize,
    ) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let pool = if workers > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(workers)
                    .thread_name(|i| format!("rules-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            )
        } else {
            None
        };
        Ok(Self {
            shards: (0..workers)
                .map(|_| Processor::new(rules.clone(), config.clone(), context.clone()))
                .collect(),
            pool,
        })
    }

    pub fn workers(&self) -> usize {
        self.shards.len()
    }

    /// Processes a batch, appending every output to `out`.
    pub fn process(&mut self, messages: &[Message], out: &mut Vec<Output>) {
        let Some(pool) = &self.pool else {
            self.shards[0].process(messages, out);
            return;
        };
        let n = self.shards.len();
        let mut split: Vec<Vec<&Message>> = (0..n).map(|_| Vec::new()).collect();
        for m in messages {
            let key = m.device_id.as_deref().unwrap_or(&m.topic);
            let shard = BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize % n;
            split[shard].push(m);
        }
        let results: Vec<Vec<Output>> = pool.install(|| {
            self.shards
                .par_iter_mut()
                .zip(split.par_iter())
                .map(|(processor, msgs)| {
                    let mut shard_out = Vec::new();
                    if !msgs.is_empty() {
                        processor.process_refs(msgs, &mut shard_out);
                    }
                    shard_out
                })
                .collect()
        });
        for r in results {
            out.extend(r);
        }
    }
}
