//! What [`InvalidPolicies`](crate::InvalidPolicies) and [`InvalidRoutes`](crate::InvalidRoutes)
//! share: the Kubernetes source cannot refuse an object with problems, so each reporter
//! remembers which objects had which problems, logs an object again only when its
//! problems change (every resync would repeat it otherwise), notes when one is fixed or
//! deleted, and keeps the count in a gauge.

use std::collections::BTreeMap;

use crate::metrics::InvalidCount;
use crate::objects::ObjectKey;
use crate::validate::FieldError;

/// The problems last logged, per object, and the gauge that counts them.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    logged: BTreeMap<ObjectKey, Vec<String>>,
    metrics: Option<InvalidCount>,
}

impl Ledger {
    /// Also keeps the count in `metrics` (0 until the first update).
    pub(crate) fn with_metrics(mut self, metrics: InvalidCount) -> Self {
        metrics.set(0);
        self.metrics = Some(metrics);
        self
    }

    /// Checks `objects` with `problems`: calls `changed(key, object, problems, lines)` for
    /// each object whose problems differ from the last update (`lines` are
    /// `field: message`, joined with `; `), and `gone(key)` for each object that had
    /// problems and no longer has (fixed or deleted). Returns how many have problems.
    pub(crate) fn update<'a, T: 'a>(
        &mut self,
        objects: impl IntoIterator<Item = (&'a ObjectKey, &'a T)>,
        problems: impl Fn(&T) -> Vec<FieldError>,
        mut changed: impl FnMut(&ObjectKey, &T, &[FieldError], &str),
        mut gone: impl FnMut(&ObjectKey),
    ) -> usize {
        let mut now: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
        for (key, object) in objects {
            let found = problems(object);
            if found.is_empty() {
                continue;
            }
            let lines: Vec<String> = found
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            if self.logged.get(key) != Some(&lines) {
                changed(key, object, &found, &lines.join("; "));
            }
            now.insert(key.clone(), lines);
        }
        for key in self.logged.keys().filter(|k| !now.contains_key(*k)) {
            gone(key);
        }
        self.logged = now;
        if let Some(metrics) = &self.metrics {
            metrics.set(self.logged.len());
        }
        self.logged.len()
    }
}
