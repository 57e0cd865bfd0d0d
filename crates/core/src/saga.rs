//! The saga planner: a validated manifest and the destination's nodes become
//! an ordered list of steps, each with what to run, whether it can be
//! undone, its timeout and its retry policy.
//!
//! For the `process` adapter a release is rolled across the nodes in
//! batches of `max_unavailable`, blue-green on each node:
//!
//! ```text
//! pre hooks → per batch: start (new port) → health check → switch route → stop old → post hooks
//! ```
//!
//! Undo of each step restores exactly what was there before it: undo of
//! `start` stops the new instance and frees its port, undo of `switch`
//! points the route back at the previous instance, undo of `stop old`
//! starts the previous release again on its old port.
//!
//! For the `command` adapter the manifest's `steps:` run in order, each on
//! one node of the destination (the first selected one). Such steps are
//! *movable*: when their node is lost they are handed to another node of
//! the destination (with the assignment epoch bumped), which runs the
//! step's `check` before running it again. Process steps belong to their
//! node: a lost node's are skipped, never moved.
//!
//! The `docker` adapter is planned exactly like `process` (the same four
//! blue-green steps, the same undos), with [`StepAction::StartContainer`]
//! instead of [`StepAction::StartInstance`].
//!
//! Every step names the node adapter that runs it ([`StepPlan::adapter`]:
//! the destination's adapter, or `command` for hooks), so the node never
//! guesses it from the action.
//!
//! `strategy: { type: recreate }` (apps that cannot run twice) plans, per
//! node, [`StepAction::StopCurrent`] first (undo: start it again and route
//! to it), then start, health check and switch; there is no stop-old.
//!
//! `strategy.canary` plans the first `canary.nodes` nodes, then one
//! [`StepAction::CanaryPause`] step (on the first canary node, which runs
//! the analysis if there is one), then the other nodes; see
//! `deploy::canary` for how the deployment pauses there.
//!
//! A stack (several destinations) is planned destination by destination,
//! in the manifest's order, into one saga.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::{Analysis, StrategyKind};
use crate::manifest::{ContainerManifest, HealthCheck, Kind, RetryPolicy, Spec};

/// What a node executes for one step. This is the contract between the
/// leader and `fleet-node` (sent as JSON in `StepAssignment.action_json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StepAction {
    /// Start `release` as a new, supervised instance on a freshly allocated
    /// port. Output: `{"port": P, "pid": N}`. Undo: stop it, free the port.
    StartInstance { app: String, release: String, run: Vec<String>, env: BTreeMap<String, String> },
    /// Create and start a container of `release` (the image with
    /// `{release}` replaced) on the node's Docker Engine, publishing
    /// `container.container_port` on a free port of 127.0.0.1, labelled
    /// with the deployment and its fencing token. Output: `{"container":
    /// NAME, "port": P, ...}`. Undo: stop and remove that container.
    StartContainer { app: String, release: String, container: Box<ContainerManifest>, env: BTreeMap<String, String> },
    /// Probe the instance started for `release` until `healthy_threshold`
    /// consecutive probes pass, or fail at `deadline_ms`. Undo: nothing.
    HealthCheck { app: String, release: String, check: HealthCheck },
    /// Point the app's route (a TCP proxy on its stable port) at the
    /// instance of `release`. `port` 0 = the node picks the stable port once
    /// and keeps it. `listen`: the IP address the route listens on (absent:
    /// 127.0.0.1). Output: `{"route": "ADDR:P", "previous": ...}`.
    /// Undo: point the route back at the previous instance (or close it).
    SwitchRoute {
        app: String,
        release: String,
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen: Option<String>,
    },
    /// Stop the instance the route pointed at before (waiting up to
    /// `drain_ms` for its open connections). Output: what was stopped.
    /// Undo: start that release again on the same port.
    StopOld { app: String, release: String, drain_ms: u64 },
    /// A shell command (`sh -c`). `check` exit 0 = already done.
    Command { run: String, undo: Option<String>, check: Option<String> },
    /// `recreate`: stop the instance the route points at (waiting up to
    /// `drain_ms` for its connections) before `release` is started. The
    /// route stays where it is (nothing answers behind it until the switch).
    /// Output: `{"stopped": ...}`. Undo: start that release again on its
    /// port and point the route back at it.
    StopCurrent { app: String, release: String, drain_ms: u64 },
    /// A canary's pause: the release runs on the `canary` nodes. With
    /// `analysis`, the node probes the canary instance of `release` for
    /// `pause_ms` (passing to the end = promoted; failing = the step
    /// fails, and the deployment is undone). Without it, the step is never
    /// sent: `fleetctl promote` or the pause passing completes it. Undo:
    /// nothing.
    CanaryPause {
        app: String,
        release: String,
        canary: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pause_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        analysis: Option<Analysis>,
    },
}

impl StepAction {
    /// Short verb for progress lines.
    pub fn verb(&self) -> &'static str {
        match self {
            StepAction::StartInstance { .. } | StepAction::StartContainer { .. } => "start",
            StepAction::HealthCheck { .. } => "health",
            StepAction::SwitchRoute { .. } => "switch",
            StepAction::StopOld { .. } => "stop-old",
            StepAction::Command { .. } => "command",
            StepAction::StopCurrent { .. } => "stop-current",
            StepAction::CanaryPause { analysis: Some(_), .. } => "analyze",
            StepAction::CanaryPause { analysis: None, .. } => "pause",
        }
    }
}

/// One planned step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    /// Human-readable: `start web@v2 on node-1`.
    pub name: String,
    /// The worker node that runs it.
    pub node: String,
    /// The node adapter that carries it out (`process`, `docker`,
    /// `command`). Empty in plans recorded before it existed: the node then
    /// picks by the action's kind, as it did then.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub adapter: String,
    /// The destination it works on (a stack has several).
    #[serde(default)]
    pub destination: String,
    /// Any node of the destination may run it: when its node is lost it
    /// is handed to another instead of skipped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub movable: bool,
    pub action: StepAction,
    /// `false`: once done, a later failure is never undone blindly.
    pub reversible: bool,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
}

/// Extra time a step's timeout allows beyond the health-check deadline.
const HEALTH_STEP_SLACK_MS: u64 = 5_000;

/// Plan the part of a deployment of `spec` that goes to `destination`,
/// whose selected nodes are `nodes` (sorted, non-empty).
pub fn plan(spec: &Spec, destination: &str, nodes: &[String]) -> Vec<StepPlan> {
    match spec.kind() {
        Kind::Process | Kind::Docker => plan_bluegreen(spec, destination, nodes),
        Kind::Command => plan_command(spec, destination, nodes),
    }
}

/// Command steps, each once, on the destination's first node; movable.
fn plan_command(spec: &Spec, destination: &str, nodes: &[String]) -> Vec<StepPlan> {
    let Some(node) = nodes.first() else { return vec![] };
    let multi = spec.destinations().len() > 1;
    let on = |what: &str| if multi { format!("{what} on {destination}") } else { what.to_string() };
    let step = |name: String, action: StepAction, reversible: bool, timeout_ms: u64| StepPlan {
        name,
        node: node.clone(),
        adapter: Kind::Command.adapter().to_string(),
        destination: destination.to_string(),
        movable: true,
        action,
        reversible,
        timeout_ms,
        retry: spec.retry.clone(),
    };
    let hook = |which: &str, hooks: &[String]| -> Vec<StepPlan> {
        hooks
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let action = StepAction::Command { run: h.clone(), undo: None, check: None };
                step(on(&format!("{which}-hook {}", i + 1)), action, true, spec.step_timeout_ms)
            })
            .collect()
    };
    let mut steps = hook("pre", &spec.pre_hooks);
    for c in &spec.steps {
        let action = StepAction::Command { run: c.run.clone(), undo: c.undo.clone(), check: c.check.clone() };
        steps.push(step(on(&c.name), action, !c.irreversible, c.timeout_ms));
    }
    steps.extend(hook("post", &spec.post_hooks));
    steps
}

/// `process` and `docker`: blue-green (or recreate) on each node, rolled
/// across the nodes in batches; a canary's nodes first, then its pause.
fn plan_bluegreen(spec: &Spec, destination: &str, nodes: &[String]) -> Vec<StepPlan> {
    let Some(health) = spec.health.clone() else { return vec![] };
    let kind = spec.kind();
    let mut steps = Vec::new();
    let step = |name: String, node: &str, action: StepAction, timeout_ms: u64, retry: RetryPolicy| StepPlan {
        adapter: match action {
            StepAction::Command { .. } => Kind::Command.adapter(),
            _ => kind.adapter(),
        }
        .to_string(),
        name,
        node: node.to_string(),
        destination: destination.to_string(),
        movable: false,
        action,
        reversible: true,
        timeout_ms,
        retry,
    };
    let once = RetryPolicy { max_attempts: 1, ..spec.retry.clone() };
    let label = format!("{}@{}", spec.app, spec.release);
    let hook = |steps: &mut Vec<StepPlan>, which: &str, hooks: &[String]| {
        for node in nodes {
            for (i, h) in hooks.iter().enumerate() {
                steps.push(step(
                    format!("{which}-hook {} on {node}", i + 1),
                    node,
                    StepAction::Command { run: h.clone(), undo: None, check: None },
                    spec.step_timeout_ms,
                    spec.retry.clone(),
                ));
            }
        }
    };
    let stop_timeout = spec.step_timeout_ms.max(spec.drain_ms + HEALTH_STEP_SLACK_MS);
    let recreate = spec.strategy == StrategyKind::Recreate;
    let roll = |steps: &mut Vec<StepPlan>, nodes: &[String]| {
        for batch in nodes.chunks(spec.max_unavailable.max(1) as usize) {
            if recreate {
                for node in batch {
                    steps.push(step(
                        format!("stop current {} on {node}", spec.app),
                        node,
                        StepAction::StopCurrent { app: spec.app.clone(), release: spec.release.clone(), drain_ms: spec.drain_ms },
                        stop_timeout,
                        spec.retry.clone(),
                    ));
                }
            }
            for node in batch {
                steps.push(step(
                    format!("start {label} on {node}"),
                    node,
                    match &spec.container {
                        Some(container) => StepAction::StartContainer {
                            app: spec.app.clone(),
                            release: spec.release.clone(),
                            container: Box::new(container.clone()),
                            env: spec.instance_env(),
                        },
                        None => StepAction::StartInstance {
                            app: spec.app.clone(),
                            release: spec.release.clone(),
                            run: spec.run.clone(),
                            env: spec.instance_env(),
                        },
                    },
                    spec.step_timeout_ms,
                    spec.retry.clone(),
                ));
            }
            for node in batch {
                steps.push(step(
                    format!("health-check {label} on {node}"),
                    node,
                    StepAction::HealthCheck { app: spec.app.clone(), release: spec.release.clone(), check: health.clone() },
                    health.deadline_ms + HEALTH_STEP_SLACK_MS,
                    once.clone(),
                ));
            }
            for node in batch {
                steps.push(step(
                    format!("switch route to {label} on {node}"),
                    node,
                    StepAction::SwitchRoute {
                        app: spec.app.clone(),
                        release: spec.release.clone(),
                        port: spec.port,
                        listen: spec.route_listen.clone(),
                    },
                    spec.step_timeout_ms,
                    spec.retry.clone(),
                ));
            }
            if !recreate {
                for node in batch {
                    steps.push(step(
                        format!("stop previous {} on {node}", spec.app),
                        node,
                        StepAction::StopOld { app: spec.app.clone(), release: spec.release.clone(), drain_ms: spec.drain_ms },
                        stop_timeout,
                        spec.retry.clone(),
                    ));
                }
            }
        }
    };
    hook(&mut steps, "pre", &spec.pre_hooks);
    match &spec.canary {
        None => roll(&mut steps, nodes),
        Some(c) => {
            let (first, rest) = nodes.split_at((c.nodes as usize).min(nodes.len()));
            roll(&mut steps, first);
            if let Some(node) = first.first() {
                let (name, timeout_ms) = match (&c.analysis, c.pause_ms) {
                    (Some(a), Some(p)) => (
                        format!("canary analysis of {label} on {node}"),
                        p.saturating_add(a.timeout_ms).saturating_add(HEALTH_STEP_SLACK_MS),
                    ),
                    _ => (format!("canary pause of {label} on {}", first.join(", ")), c.pause_ms.unwrap_or(spec.step_timeout_ms)),
                };
                let action = StepAction::CanaryPause {
                    app: spec.app.clone(),
                    release: spec.release.clone(),
                    canary: first.to_vec(),
                    pause_ms: c.pause_ms,
                    analysis: c.analysis.clone(),
                };
                steps.push(step(name, node, action, timeout_ms, once.clone()));
            }
            roll(&mut steps, rest);
        }
    }
    hook(&mut steps, "post", &spec.post_hooks);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{parse_manifest, Overrides};

    fn spec(extra: &str) -> Spec {
        let text = format!("app: web\nrelease: v2\ndestination: d\nrun: [srv]\nhealth: {{ tcp: true, deadline: 10s }}\n{extra}");
        parse_manifest("f", &text, &Overrides::default()).unwrap()
    }
    fn names(steps: &[StepPlan]) -> Vec<String> {
        steps.iter().map(|s| format!("{} {}", s.action.verb(), s.node)).collect()
    }

    #[test]
    fn plans() {
        let nodes = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (manifest extra, nodes, expected verb+node sequence)
        let cases: Vec<(&str, Vec<String>, Vec<&str>)> = vec![
            ("", nodes(&["a"]), vec!["start a", "health a", "switch a", "stop-old a"]),
            (
                "",
                nodes(&["a", "b"]),
                vec!["start a", "health a", "switch a", "stop-old a", "start b", "health b", "switch b", "stop-old b"],
            ),
            (
                "strategy: { max_unavailable: 2 }\n",
                nodes(&["a", "b"]),
                vec!["start a", "start b", "health a", "health b", "switch a", "switch b", "stop-old a", "stop-old b"],
            ),
            (
                "hooks: { pre: [\"echo pre\"], post: [\"echo post\"] }\n",
                nodes(&["a"]),
                vec!["command a", "start a", "health a", "switch a", "stop-old a", "command a"],
            ),
        ];
        for (extra, nodes, want) in cases {
            let got = plan(&spec(extra), "d", &nodes);
            assert_eq!(names(&got), want, "manifest extra: {extra:?}");
            assert!(got.iter().all(|s| s.reversible && s.timeout_ms > 0));
        }
    }

    #[test]
    fn docker_plans_blue_green_like_process_with_a_container_start_and_names_its_adapter() {
        let text = "app: web\nrelease: v2\ndestination: d\nimage: \"reg/web:{release}\"\ncontainer_port: 8080\npull: never\nenv: { A: b }\nhealth: { image: true, deadline: 10s }\nhooks: { pre: [\"echo pre\"] }\n";
        let spec = parse_manifest("f", text, &Overrides::default()).unwrap();
        let nodes: Vec<String> = vec!["a".into(), "b".into()];
        let got = plan(&spec, "d", &nodes);
        let want =
            ["command a", "command b", "start a", "health a", "switch a", "stop-old a", "start b", "health b", "switch b", "stop-old b"];
        assert_eq!(names(&got), want);
        // (verb, adapter): hooks go to `command`, the rest to `docker`.
        for s in &got {
            let want = if s.action.verb() == "command" { "command" } else { "docker" };
            assert_eq!(s.adapter, want, "{}", s.name);
            assert!(s.reversible && !s.movable);
        }
        let StepAction::StartContainer { container, env, release, .. } = &got[2].action else { panic!("{:?}", got[2].action) };
        assert_eq!((container.image.as_str(), container.container_port, release.as_str()), ("reg/web:{release}", 8080, "v2"));
        assert_eq!((container.pull, env.get("A").map(String::as_str)), (crate::manifest::PullPolicy::Never, Some("b")));
        // The same manifest with `run:` plans process steps for `process`.
        let p = plan(&super::tests::spec(""), "d", &nodes[..1]);
        assert!(p.iter().all(|s| s.adapter == "process"));
        assert!(matches!(p[0].action, StepAction::StartInstance { .. }));
        // An old plan without `adapter` still reads (empty).
        let mut v = serde_json::to_value(&p[0]).unwrap();
        v.as_object_mut().unwrap().remove("adapter");
        assert_eq!(serde_json::from_value::<StepPlan>(v).unwrap().adapter, "");
    }

    #[test]
    fn health_step_is_not_retried_and_outlives_its_deadline() {
        let steps = plan(&spec(""), "d", &["a".into()]);
        let h = &steps[1];
        assert_eq!(h.retry.max_attempts, 1);
        assert!(h.timeout_ms > 10_000);
    }

    #[test]
    fn command_steps_run_once_on_the_first_node_and_are_movable() {
        let text = "app: infra\nrelease: v7\ndestination: net\nhooks: { pre: [\"echo pre\"] }\nsteps:\n  - { name: plan, run: \"tf plan\" }\n  - { name: apply, run: \"tf apply\", undo: \"tf destroy\", check: \"test -f done\", timeout: 2s }\n  - { name: migrate, run: \"./migrate\", irreversible: true }\n";
        let spec = parse_manifest("f", text, &Overrides::default()).unwrap();
        let got = plan(&spec, "net", &["b".into(), "c".into()]);
        // (name, node, reversible, timeout)
        let want = [
            ("pre-hook 1", "b", true, spec.step_timeout_ms),
            ("plan", "b", true, spec.step_timeout_ms),
            ("apply", "b", true, 2000),
            ("migrate", "b", false, spec.step_timeout_ms),
        ];
        assert_eq!(got.len(), want.len());
        for (s, (name, node, reversible, timeout)) in got.iter().zip(want) {
            assert_eq!((s.name.as_str(), s.node.as_str(), s.reversible, s.timeout_ms), (name, node, reversible, timeout));
            assert!(s.movable && s.destination == "net");
        }
        assert_eq!(
            got[2].action,
            StepAction::Command { run: "tf apply".into(), undo: Some("tf destroy".into()), check: Some("test -f done".into()) }
        );
        assert!(got.iter().all(|s| s.adapter == "command"));
        // Process steps are never movable.
        assert!(plan(&super::tests::spec(""), "d", &["a".into()]).iter().all(|s| !s.movable && s.destination == "d"));
    }
}
