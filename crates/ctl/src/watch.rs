//! Following a deployment until it ends: a watch stream that survives the
//! death of the coordinator it is connected to, and the three ways of
//! showing progress (bars on a terminal, plain lines, JSON lines).

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fleet_core::deploy::Deployment;
use fleet_net::now_ms;
use fleet_proto::{DeploymentReply, GetDeploymentRequest};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::codec::Streaming;
use tonic::Code;

use crate::client::{Client, ServerError};
use crate::exit;
use crate::output::{ErrorLine, Line, ResultLine, Submitted};
use crate::progress::{current_work, diff, event_line, header, node_lines, summary, StepEventStatus, WatchEvent};

/// How long a watch stream may stay silent before the watcher checks the
/// deployment with a linearizable read (a partitioned coordinator can keep
/// a stream open without ever sending the next change).
const SILENCE: Duration = Duration::from_secs(15);
/// How long past its deadline the cluster has to end a deployment before
/// the watcher gives up on it (exit 5).
const DEADLINE_GRACE_MS: i64 = 60_000;

/// Snapshots of one deployment, newest only, each different from the one
/// before. Reconnects to any coordinator when the stream breaks (the watch
/// is a read; every coordinator answers it) and ignores snapshots older
/// than one already seen (a lagging coordinator after a reconnect).
pub struct Watcher<'a> {
    client: &'a mut Client,
    id: String,
    stream: Option<Streaming<DeploymentReply>>,
    last: Option<Deployment>,
    last_index: u64,
    /// Since when the stream keeps breaking without a new snapshot.
    failing_since: Option<Instant>,
    silence: Duration,
}

impl<'a> Watcher<'a> {
    pub fn new(client: &'a mut Client, id: &str) -> Self {
        Watcher { client, id: id.to_string(), stream: None, last: None, last_index: 0, failing_since: None, silence: SILENCE }
    }

    /// Start from a snapshot already in hand (the answer to a submit).
    pub fn seed(&mut self, d: Deployment, applied_index: u64) {
        self.last_index = applied_index;
        self.last = Some(d);
    }

    pub fn last(&self) -> Option<&Deployment> {
        self.last.as_ref()
    }

    /// The next new snapshot; `None` once the deployment has ended.
    pub async fn next(&mut self) -> anyhow::Result<Option<Deployment>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.last.as_ref().is_some_and(|d| d.state.is_terminal()) {
                return Ok(None);
            }
            if self.stream.is_none() {
                let id = self.id.clone();
                // No per-call timeout on the request: it would cut the
                // stream off. `call` bounds only the wait for its headers.
                let s = self
                    .client
                    .call(|mut cl, _| {
                        let req = GetDeploymentRequest { id: id.clone() };
                        async move { cl.watch_deployment(req).await.map(|r| r.into_inner()) }
                    })
                    .await
                    .with_context(|| format!("watching {id}"))?;
                self.stream = Some(s);
            }
            let stream = self.stream.as_mut().expect("opened above");
            match tokio::time::timeout(self.silence, stream.message()).await {
                Ok(Ok(Some(reply))) => {
                    if let Some(d) = self.accept(reply)? {
                        return Ok(Some(d));
                    }
                }
                // The stream ended: the deployment ended (the next turn
                // returns), or the coordinator is shutting down.
                Ok(Ok(None)) => {
                    self.stream = None;
                    if !self.last.as_ref().is_some_and(|d| d.state.is_terminal()) {
                        self.broken(None)?;
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
                Ok(Err(status)) => {
                    self.stream = None;
                    if matches!(
                        status.code(),
                        Code::NotFound | Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented
                    ) {
                        return Err(ServerError::new(&status, "the coordinator").into());
                    }
                    self.broken(Some(status.to_string()))?;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(_silent) => {
                    // Ask the leader; if it knows more than the stream said,
                    // the stream is stale: reconnect.
                    let id = self.id.clone();
                    let reply = self
                        .client
                        .call(|mut cl, timeout| {
                            let mut req = tonic::Request::new(GetDeploymentRequest { id: id.clone() });
                            req.set_timeout(timeout);
                            async move { cl.get_deployment(req).await.map(|r| r.into_inner()) }
                        })
                        .await
                        .with_context(|| format!("checking on {id}"))?;
                    if let Some(d) = self.accept(reply)? {
                        self.stream = None;
                        return Ok(Some(d));
                    }
                }
            }
        }
    }

    /// The stream broke; give up when it keeps breaking for longer than
    /// the client retries calls.
    fn broken(&mut self, why: Option<String>) -> anyhow::Result<()> {
        let since = *self.failing_since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.client.retry_for {
            anyhow::bail!(
                "lost the watch of {} for {:?}{}; `fleetctl watch {}` tries again",
                self.id,
                self.client.retry_for,
                why.map(|w| format!(" (last error: {w})")).unwrap_or_default(),
                self.id
            );
        }
        Ok(())
    }

    fn accept(&mut self, reply: DeploymentReply) -> anyhow::Result<Option<Deployment>> {
        let d: Deployment = serde_json::from_str(&reply.deployment_json).with_context(|| {
            format!("a coordinator sent deployment {} in a form this fleetctl cannot read; are both the same version?", self.id)
        })?;
        if reply.applied_index != 0 && reply.applied_index < self.last_index {
            return Ok(None);
        }
        if let Some(last) = &self.last {
            if *last == d || d.events.len() < last.events.len() {
                return Ok(None);
            }
        }
        self.last_index = self.last_index.max(reply.applied_index);
        self.failing_since = None;
        self.last = Some(d.clone());
        Ok(Some(d))
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Progress bars (stdout and stderr are terminals).
    Bars,
    /// One plain line per change.
    Lines,
    /// One JSON object per event.
    Json,
}

impl Style {
    pub fn pick(json: bool) -> Style {
        if json {
            Style::Json
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Style::Bars
        } else {
            Style::Lines
        }
    }
}

struct Bars {
    multi: MultiProgress,
    header: ProgressBar,
    nodes: Vec<(String, ProgressBar)>,
}

/// In plain-line mode a step's start is printed only when it is still
/// running after this long, so a quick step takes one line and a slow
/// one shows what the deployment waits for.
const SLOW_STEP: Duration = Duration::from_secs(2);

/// Turns snapshots into output.
pub struct Renderer {
    style: Style,
    shown: Option<Deployment>,
    bars: Option<Bars>,
    /// Plain-line mode: the running step's line, since when, and whether it
    /// was printed.
    running: Option<(String, Instant, bool)>,
}

impl Renderer {
    pub fn new(style: Style) -> Self {
        Renderer { style, shown: None, bars: None, running: None }
    }

    /// Call now and then: prints a slow step's start in plain-line mode.
    pub fn tick(&mut self) {
        if let Some((line, since, printed)) = &mut self.running {
            if !*printed && since.elapsed() >= SLOW_STEP {
                println!("{line}");
                *printed = true;
            }
        }
    }

    /// Show what changed since the last snapshot shown.
    pub fn show(&mut self, d: &Deployment) {
        let events = diff(self.shown.as_ref(), d);
        match self.style {
            Style::Json => {
                for e in &events {
                    println!("{}", serde_json::to_string(e).expect("events serialize"));
                }
            }
            Style::Lines => {
                for e in &events {
                    let line = event_line(d, e);
                    match e {
                        WatchEvent::Step { status: StepEventStatus::Running, .. } => self.running = Some((line, Instant::now(), false)),
                        _ => println!("{line}"),
                    }
                }
                if current_work(d).is_none() {
                    self.running = None;
                }
            }
            Style::Bars => {
                let bars = self.bars.get_or_insert_with(|| {
                    let multi = MultiProgress::new();
                    let header = multi.add(
                        ProgressBar::new_spinner()
                            .with_style(ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}").expect("valid template")),
                    );
                    header.enable_steady_tick(Duration::from_millis(100));
                    Bars { multi, header, nodes: vec![] }
                });
                for e in &events {
                    // The bars show what runs now; the log above them what happened.
                    if !matches!(e, WatchEvent::Step { status: StepEventStatus::Running, .. }) {
                        let _ = bars.multi.println(event_line(d, e));
                    }
                }
                bars.header.set_message(header(d));
                for (node, text) in node_lines(d) {
                    let bar = match bars.nodes.iter().find(|(n, _)| *n == node) {
                        Some((_, b)) => b.clone(),
                        None => {
                            let b = bars.multi.add(
                                ProgressBar::new_spinner()
                                    .with_style(ProgressStyle::with_template("  {prefix:<12.bold} {msg}").expect("valid template"))
                                    .with_prefix(node.clone()),
                            );
                            bars.nodes.push((node.clone(), b.clone()));
                            b
                        }
                    };
                    bar.set_message(text);
                }
            }
        }
        self.shown = Some(d.clone());
    }

    /// Remove the bars (before printing anything final).
    pub fn clear(&mut self) {
        if let Some(b) = self.bars.take() {
            for (_, n) in &b.nodes {
                n.finish_and_clear();
            }
            b.header.finish_and_clear();
            let _ = b.multi.clear();
        }
    }

    /// The deployment ended: the summary (text) or the result object (JSON).
    pub fn finish(&mut self, d: &Deployment, code: i32) {
        self.show(d);
        self.clear();
        match self.style {
            Style::Json => println!("{}", result_json(d, code)),
            Style::Lines | Style::Bars => {
                let (line, next) = summary(d);
                println!("{line}");
                if let Some(next) = next {
                    println!("{next}");
                }
            }
        }
    }
}

/// `{"type":"result","id","state","exit_code","deployment"}`.
pub fn result_json(d: &Deployment, code: i32) -> serde_json::Value {
    json_value(&Line::Result(Box::new(ResultLine::of(d, code))))
}

/// `{"type":"submitted","id","state",...}`.
pub fn submitted_json(d: &Deployment) -> serde_json::Value {
    json_value(&Line::Submitted(Submitted::of(d)))
}

fn json_value(line: &Line) -> serde_json::Value {
    // Every field is a string, number, bool, list or string-keyed map.
    serde_json::to_value(line).unwrap_or_default()
}

/// The exit code of an ended deployment (DESIGN.md).
pub fn exit_code(d: &Deployment) -> i32 {
    d.exit_code().map(i32::from).unwrap_or(exit::CLUSTER)
}

/// Follow deployment `id` until it ends and return its exit code. `seed`
/// is a snapshot already shown elsewhere or in hand (a submit's answer),
/// with the applied index it was read at.
pub async fn follow(client: &mut Client, id: &str, seed: Option<(Deployment, u64)>, style: Style) -> anyhow::Result<i32> {
    let mut watcher = Watcher::new(client, id);
    let mut out = Renderer::new(style);
    if let Some((d, index)) = seed {
        out.show(&d);
        watcher.seed(d, index);
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    loop {
        // The cluster ends a deployment at its deadline; if it has not a
        // while after, stop waiting rather than hang a CI job.
        let guard = watcher
            .last()
            .map(|d| (d.deadline_ms + DEADLINE_GRACE_MS - now_ms()).max(30_000))
            .map(|ms| Duration::from_millis(ms as u64))
            .unwrap_or(Duration::from_secs(24 * 3600));
        let guard = tokio::time::sleep(guard);
        tokio::pin!(guard);
        // One `next()` is polled to completion across ticks: dropping it
        // would restart its silence timer and backoff.
        let next = {
            let next = watcher.next();
            tokio::pin!(next);
            loop {
                tokio::select! {
                    r = &mut next => break Some(r),
                    _ = ticks.tick() => out.tick(),
                    _ = &mut guard => break None,
                    _ = &mut ctrl_c => {
                        out.clear();
                        eprintln!("stopped watching {id}; it goes on in the cluster. `fleetctl watch {id}` follows it again, `fleetctl cancel {id}` stops it");
                        return Ok(exit::INTERRUPTED);
                    },
                }
            }
        };
        match next {
            Some(Ok(Some(d))) => out.show(&d),
            Some(Ok(None)) => {
                let d = watcher.last().expect("ended after a snapshot").clone();
                let code = exit_code(&d);
                out.finish(&d, code);
                return Ok(code);
            }
            Some(Err(e)) => {
                out.clear();
                if style == Style::Json {
                    let code = crate::client::exit_code_of(&e);
                    println!("{}", json_value(&Line::Error(ErrorLine::failed(code, Some(id), format!("{e:#}")))));
                }
                return Err(e);
            }
            None => {
                out.clear();
                let d = watcher.last().expect("a guard needs a snapshot").clone();
                if style == Style::Json {
                    println!("{}", result_json(&d, exit::TIMED_OUT));
                } else {
                    println!(
                        "{id} is still {} {} past its deadline and the cluster has not ended it; `fleetctl status {id}` shows where it is stuck, `fleetctl cancel {id}` stops it",
                        d.state,
                        crate::progress::fmt_ms(now_ms() - d.deadline_ms)
                    );
                }
                return Ok(exit::TIMED_OUT);
            }
        }
    }
}
