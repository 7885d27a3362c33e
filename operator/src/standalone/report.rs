//! What standalone mode prints: one line per deployment whenever its phase,
//! readiness or recipe changes, each worker's trays whenever placement
//! changes, and the core's notes. Pure formatting plus the memory of what
//! was last printed, so a steady fleet prints nothing.

use std::collections::BTreeMap;

use crate::crd::{ModelDeploymentStatus, RecipeStatus};
use crate::pipeline::Note;

/// One line naming a recipe and its prediction.
pub fn recipe_line(recipe: &RecipeStatus) -> String {
    let mut line = format!(
        "{} + {} on {} GPUs",
        recipe.prefill, recipe.decode, recipe.gpus
    );
    if let Some(p) = &recipe.predicted {
        line.push_str(&format!(
            ", predicted {} tok/s/GPU at {} tok/s/user",
            p.tok_s_per_gpu, p.tok_s_per_user
        ));
    }
    line
}

/// The headline of a status: phase, workers running, recipe.
pub fn headline(key: &str, generation: i64, status: &ModelDeploymentStatus) -> String {
    let phase = status
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Pending".into());
    let mut line = format!("{key} (generation {generation}): {phase}");
    if let Some(ready) = &status.ready {
        line.push_str(&format!(", {ready} workers running"));
    }
    if let Some(r) = &status.recipe {
        line.push_str(&format!("; {}", recipe_line(r)));
    }
    line
}

/// One line per worker: name, role, rack and trays with GPU indices.
pub fn worker_lines(status: &ModelDeploymentStatus) -> Vec<String> {
    status
        .workers
        .iter()
        .map(|w| {
            let trays: Vec<String> = w
                .placement
                .iter()
                .map(|p| {
                    let gpus: Vec<String> = p.gpus.iter().map(u32::to_string).collect();
                    format!("{}[{}]", p.node, gpus.join(","))
                })
                .collect();
            format!(
                "  {:<10} {:<8} {:<9} {} -> {}",
                w.name,
                format!("{:?}", w.role).to_lowercase(),
                format!("{:?}", w.state),
                w.rack,
                trays.join(" ")
            )
        })
        .collect()
}

/// What was last printed per deployment.
#[derive(Debug, Default)]
pub struct Printer {
    shown: BTreeMap<String, (String, String)>,
}

impl Printer {
    /// The lines to print for `key` now (empty when nothing changed).
    pub fn lines(
        &mut self,
        key: &str,
        generation: i64,
        status: &ModelDeploymentStatus,
        notes: &[Note],
    ) -> Vec<String> {
        let head = headline(key, generation, status);
        let workers = worker_lines(status).join("\n");
        let placement: String = status
            .workers
            .iter()
            .map(|w| format!("{}:{}:{:?};", w.name, w.rack, w.placement))
            .collect();
        let before = self.shown.get(key).cloned();
        let mut out = Vec::new();
        for n in notes {
            let level = if n.warning { "warning" } else { "event" };
            out.push(format!("{key}: {level} {}: {}", n.reason, n.message));
        }
        let head_changed = before.as_ref().map(|b| &b.0) != Some(&head);
        let placement_changed = before.as_ref().map(|b| &b.1) != Some(&placement);
        if head_changed || placement_changed {
            out.push(head.clone());
        }
        if placement_changed && !workers.is_empty() {
            out.push(workers);
        }
        self.shown.insert(key.to_string(), (head, placement));
        out
    }

    /// Forgets `key` (its spec went away).
    pub fn forget(&mut self, key: &str) {
        self.shown.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{NodeGpus, Phase, Pool, WorkerState, WorkerStatus};

    #[test]
    fn prints_changes_only() {
        let mut status = ModelDeploymentStatus {
            phase: Some(Phase::Placed),
            ready: Some("0/1".into()),
            workers: vec![WorkerStatus {
                name: "decode-0".into(),
                role: Pool::Decode,
                rack: "rack-a".into(),
                placement: vec![NodeGpus {
                    node: "tray-00".into(),
                    gpus: vec![0, 1],
                }],
                state: WorkerState::Launching,
                message: None,
            }],
            ..Default::default()
        };
        let mut p = Printer::default();
        let first = p.lines("ns/md", 1, &status, &[]);
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(first[1].contains("tray-00[0,1]"), "{first:?}");
        assert!(p.lines("ns/md", 1, &status, &[]).is_empty());
        status.phase = Some(Phase::Ready);
        status.ready = Some("1/1".into());
        let next = p.lines("ns/md", 1, &status, &[]);
        assert_eq!(next.len(), 1);
        assert!(next[0].contains("Ready, 1/1 workers running"), "{next:?}");
    }
}
