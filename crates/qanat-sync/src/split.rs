//! Splits: half-open key ranges `[lower, upper)` over the split column, plus one split for
//! NULL keys when the column is nullable. Boundaries come from the store itself, sorted by the
//! store (`ORDER BY key`), so non-numeric keys follow the store's collation: consecutive
//! boundaries are then non-decreasing in the store's order, and every key falls in exactly
//! one range (a boundary the store deems equal to its neighbour only yields an empty range).

/// One boundary value of the split column, as the store printed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum KeyValue {
    Int(i64),
    Text(String),
}

/// A unit of work: one key range of one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Split {
    pub index: usize,
    /// Split column; `None` for the single whole-table split.
    pub column: Option<String>,
    pub lower: Option<KeyValue>,
    pub upper: Option<KeyValue>,
    /// This split holds exactly the rows whose key is NULL.
    pub nulls: bool,
    /// For a sharded source: the physical shard the split reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardRef>,
}

/// The shard of a split over a sharded source (E5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardRef {
    pub index: usize,
    /// The physical table, as stored in the shard column.
    pub name: String,
    /// The column of the logical table naming the shard, when it has one: a target read
    /// for `--verify` selects the shard's rows by it.
    pub column: Option<String>,
}

impl Split {
    pub fn whole(index: usize) -> Self {
        Split {
            index,
            column: None,
            lower: None,
            upper: None,
            nulls: false,
            shard: None,
        }
    }

    /// Whether `key` belongs to this split under the ordering `cmp` (the store's).
    pub fn contains_by<F>(&self, key: Option<&KeyValue>, cmp: F) -> bool
    where
        F: Fn(&KeyValue, &KeyValue) -> std::cmp::Ordering,
    {
        if self.column.is_none() {
            return true;
        }
        let Some(key) = key else {
            return self.nulls;
        };
        if self.nulls {
            return false;
        }
        self.lower.as_ref().is_none_or(|l| cmp(key, l).is_ge())
            && self.upper.as_ref().is_none_or(|u| cmp(key, u).is_lt())
    }

    /// The SQL predicate selecting this split, with `quote_ident` and `quote_text` for the
    /// dialect.
    pub fn predicate(
        &self,
        quote_ident: impl Fn(&str) -> String,
        quote_text: impl Fn(&str) -> String,
    ) -> String {
        let keys = self.key_predicate(&quote_ident, &quote_text);
        match &self.shard {
            Some(ShardRef {
                name,
                column: Some(c),
                ..
            }) => format!("{} = {} AND ({keys})", quote_ident(c), quote_text(name)),
            _ => keys,
        }
    }

    fn key_predicate(
        &self,
        quote_ident: &impl Fn(&str) -> String,
        quote_text: &impl Fn(&str) -> String,
    ) -> String {
        let Some(col) = &self.column else {
            return "1=1".into();
        };
        let col = quote_ident(col);
        if self.nulls {
            return format!("{col} IS NULL");
        }
        let lit = |v: &KeyValue| match v {
            KeyValue::Int(i) => i.to_string(),
            KeyValue::Text(s) => quote_text(s),
        };
        let mut parts = Vec::new();
        if let Some(l) = &self.lower {
            parts.push(format!("{col} >= {}", lit(l)));
        }
        if let Some(u) = &self.upper {
            parts.push(format!("{col} < {}", lit(u)));
        }
        if parts.is_empty() {
            // Every non-NULL key; NULL keys have their own split.
            format!("{col} IS NOT NULL")
        } else {
            parts.join(" AND ")
        }
    }

    pub fn describe(&self) -> String {
        match &self.shard {
            Some(s) => format!("shard {} {}", s.name, self.describe_keys()),
            None => self.describe_keys(),
        }
    }

    fn describe_keys(&self) -> String {
        match (&self.column, self.nulls) {
            (None, _) => "whole table".into(),
            (Some(c), true) => format!("{c} IS NULL"),
            (Some(c), false) => {
                let show = |v: &Option<KeyValue>| match v {
                    None => "∞".to_string(),
                    Some(KeyValue::Int(i)) => i.to_string(),
                    Some(KeyValue::Text(s)) => format!("{s:?}"),
                };
                format!("{c} in [{}, {})", show(&self.lower), show(&self.upper))
            }
        }
    }
}

/// Ranges over `column` from a sample of keys sorted by the store: up to `max_splits` ranges
/// at the sample's quantiles, the first unbounded below and the last unbounded above, plus a
/// NULL split when `nullable`. A skewed key gets ranges of equal row counts, not equal widths.
pub fn ranges_from_sample(
    column: &str,
    sorted_sample: &[KeyValue],
    max_splits: usize,
    nullable: bool,
) -> Vec<Split> {
    let max_splits = max_splits.max(1);
    let mut bounds: Vec<KeyValue> = Vec::new();
    if !sorted_sample.is_empty() {
        for i in 1..max_splits {
            let b = &sorted_sample[i * sorted_sample.len() / max_splits];
            if bounds.last() != Some(b) {
                bounds.push(b.clone());
            }
        }
    }
    let mut splits = Vec::with_capacity(bounds.len() + 2);
    let mut lower = None;
    for b in bounds {
        splits.push(Split {
            index: splits.len(),
            column: Some(column.to_string()),
            lower: lower.take(),
            upper: Some(b.clone()),
            nulls: false,
            shard: None,
        });
        lower = Some(b);
    }
    splits.push(Split {
        index: splits.len(),
        column: Some(column.to_string()),
        lower,
        upper: None,
        nulls: false,
        shard: None,
    });
    if nullable {
        splits.push(Split {
            index: splits.len(),
            column: Some(column.to_string()),
            lower: None,
            upper: None,
            nulls: true,
            shard: None,
        });
    }
    splits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_strategy() -> impl Strategy<Value = KeyValue> {
        prop_oneof![
            (-50i64..50).prop_map(KeyValue::Int),
            "[a-dA-D]{0,3}".prop_map(KeyValue::Text),
        ]
    }

    // A case-insensitive order on text, as a store's collation might be; ints before text.
    fn collation(a: &KeyValue, b: &KeyValue) -> std::cmp::Ordering {
        match (a, b) {
            (KeyValue::Int(x), KeyValue::Int(y)) => x.cmp(y),
            (KeyValue::Int(_), KeyValue::Text(_)) => std::cmp::Ordering::Less,
            (KeyValue::Text(_), KeyValue::Int(_)) => std::cmp::Ordering::Greater,
            (KeyValue::Text(x), KeyValue::Text(y)) => x.to_lowercase().cmp(&y.to_lowercase()),
        }
    }

    proptest! {
        #[test]
        fn ranges_partition_the_key_space(
            mut sample in prop::collection::vec(key_strategy(), 0..60),
            keys in prop::collection::vec(prop::option::of(key_strategy()), 0..200),
            max_splits in 1usize..20,
            nullable in any::<bool>(),
        ) {
            sample.sort_by(collation);
            let splits = ranges_from_sample("k", &sample, max_splits, nullable);
            prop_assert!(splits.len() <= max_splits + 1);
            for (i, s) in splits.iter().enumerate() {
                prop_assert_eq!(s.index, i);
            }
            for key in &keys {
                if key.is_none() && !nullable {
                    continue;
                }
                let owners = splits
                    .iter()
                    .filter(|s| s.contains_by(key.as_ref(), collation))
                    .count();
                prop_assert_eq!(owners, 1, "key {:?} in {} splits", key, owners);
            }
        }
    }

    #[test]
    fn skewed_sample_gives_equal_count_ranges() {
        // 90% of the keys are 1..=9, the rest spread to a million.
        let mut sample: Vec<KeyValue> = (0..900).map(|i| KeyValue::Int(i % 9 + 1)).collect();
        sample.extend((0..100).map(|i| KeyValue::Int(10_000 * (i + 1))));
        sample.sort_by(collation);
        let splits = ranges_from_sample("k", &sample, 10, false);
        let low_ranges = splits
            .iter()
            .filter(|s| matches!(s.upper, Some(KeyValue::Int(u)) if u <= 10))
            .count();
        assert!(low_ranges >= 7, "{splits:?}");
    }

    #[test]
    fn predicates_quote_text_keys() {
        let s = Split {
            index: 0,
            column: Some("k".into()),
            lower: Some(KeyValue::Text("o'k".into())),
            upper: Some(KeyValue::Int(5)),
            nulls: false,
            shard: None,
        };
        let p = s.predicate(
            |c| format!("`{c}`"),
            |t| format!("'{}'", t.replace('\'', "''")),
        );
        assert_eq!(p, "`k` >= 'o''k' AND `k` < 5");
    }
}
