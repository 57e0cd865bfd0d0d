//! The blue-green steps on one node and their exact undos: `start` a new
//! instance on a free port (staged), `health`-check it, `switch` the route
//! to it (the previous active one is retired), `stop-old` the retired one;
//! and `check` (is a start already done?), the clean-up of an interrupted
//! start, and what `forget` removes (staged instances of a token).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_core::manifest::HealthCheck;
use serde_json::{json, Value};

use super::ports;
use super::proxy::{route_text, Route};
use super::state::{App, Instance};
use super::Inner;
use crate::adapter::{StepContext, StepError};
use crate::probe;
use crate::proc::{self, ExitWatch};
use crate::util::{human, indent, tail};

fn check_name(field: &'static str, value: &str) -> Result<(), StepError> {
    fleet_core::names::validate_name(field, value).map_err(|e| StepError::invalid(e.to_string()))
}

/// How many times a start tries a new port when another process took the
/// one it got.
const START_ATTEMPTS: u32 = 3;

fn substitute(argv: &[String], app: &str, release: &str, port: u16) -> Vec<String> {
    argv.iter().map(|a| a.replace("{release}", release).replace("{port}", &port.to_string()).replace("{app}", app)).collect()
}

impl Inner {
    pub(super) async fn start(
        self: &Arc<Self>,
        ctx: &StepContext,
        name: &str,
        release: &str,
        run: &[String],
        env: &BTreeMap<String, String>,
    ) -> Result<Value, StepError> {
        check_name("app", name)?;
        check_name("release", release)?;
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        let leftover = app.lock().rec.staged.clone();
        if let Some(old) = leftover {
            tracing::info!(app = name, release = %old.release, pid = old.pid, "stopping a leftover staged instance before starting {release}");
            self.stop_instance(&app, &old).await?;
            let mut st = app.lock();
            st.rec.staged = None;
            self.persist(&st)?;
        }
        // A process outside Fleet may take the port between the check and
        // the instance's bind ([`super::ports`]): an instance that exits at
        // once while another process holds its port is started again on
        // another one.
        let mut attempt = 1;
        let inst = loop {
            let port = self.ports.take(&self.recorded_ports())?;
            let tmpl = Instance {
                release: release.to_string(),
                port,
                pid: 0,
                argv: substitute(run, name, release, port),
                env: env.clone(),
                log: self.log_path(&ctx.destination, name, release, port),
                token: ctx.token,
                proc_start: None,
            };
            let (inst, mut exit) = self.launch_staged(&app, &tmpl).await?;
            let Some(how) = proc::wait_exit(&mut exit, self.cfg.exit_grace).await else { break inst };
            {
                let mut st = app.lock();
                if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
                    st.rec.staged = None;
                    self.persist(&st)?;
                }
                st.procs.remove(&inst.pid);
            }
            // Its port was taken: another process holds it now, or held it
            // for a moment (another node on this machine checking that the
            // port binds) and the instance said so in its log.
            let log_tail = tail(&inst.log, 15);
            let lost_port = !ports::bindable(port) || ports::says_port_in_use(&log_tail);
            if attempt < START_ATTEMPTS && lost_port {
                tracing::warn!(app = name, release, port, attempt, "{name}@{release} {how} right after it started because another process took port {port}; starting it again on another port");
                attempt += 1;
                continue;
            }
            return Err(StepError::invalid(format!(
                "{name}@{release} {how} right after it started (`{}`); last lines of its log {}:\n{}\nFix the release or the manifest's `run`, then deploy again",
                inst.argv.join(" "),
                inst.log.display(),
                indent(&log_tail),
            )));
        };
        Ok(json!({"port": inst.port, "pid": inst.pid, "release": inst.release}))
    }

    /// Launch `tmpl` as `app`'s staged instance and record it (with its
    /// fencing token) before anything else can act on the app.
    ///
    /// The spawn waits for the child's exec and the record for two
    /// fsyncs: a few milliseconds that run on tokio's blocking pool, not on
    /// a runtime worker, so the node goes on taking and answering the
    /// other destinations' steps while many instances start at once.
    async fn launch_staged(self: &Arc<Self>, app: &Arc<App>, tmpl: &Instance) -> Result<(Instance, ExitWatch), StepError> {
        let label = format!("{}@{}", app.name, tmpl.release);
        let (this, app, tmpl) = (self.clone(), app.clone(), tmpl.clone());
        tokio::task::spawn_blocking(move || {
            let mut st = app.lock();
            let inst = this.launch(&app.destination, &app.name, &mut st, &tmpl)?;
            st.rec.staged = Some(inst.clone());
            if let Err(e) = this.persist(&st) {
                proc::signal_group(inst.pid, libc::SIGKILL);
                st.rec.staged = None;
                return Err(e);
            }
            let exit = this.exit_watch(&mut st, &inst);
            Ok((inst, exit))
        })
        .await
        .map_err(|e| StepError::transient(format!("starting {label} did not finish ({e}); the leader runs the step again")))?
    }

    pub(super) async fn undo_start(
        &self,
        ctx: &StepContext,
        name: &str,
        release: &str,
        output: Option<&Value>,
    ) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let port = output.and_then(|o| o.get("port")).and_then(Value::as_u64).map(|p| p as u16);
        let matches = |i: &Option<Instance>| i.as_ref().is_some_and(|i| i.release == release && port.is_none_or(|p| p == i.port));
        let (slot, inst) = {
            let st = app.lock();
            if matches(&st.rec.active) {
                let a = st.rec.active.clone().map(|a| a.label(name)).unwrap_or_default();
                return Err(StepError::invalid(format!(
                    "{a} is serving {name}'s route, so it is not stopped; undo the route switch first (the leader does this in order)"
                )));
            }
            if matches(&st.rec.staged) {
                ("staged", st.rec.staged.clone())
            } else if matches(&st.rec.retired) {
                ("retired", st.rec.retired.clone())
            } else {
                ("", None)
            }
        };
        let Some(inst) = inst else { return Ok(json!({"stopped": null})) };
        self.stop_instance(&app, &inst).await?;
        let mut st = app.lock();
        match slot {
            "staged" => st.rec.staged = None,
            _ => st.rec.retired = None,
        }
        self.persist(&st)?;
        Ok(json!({"stopped": inst}))
    }

    pub(super) async fn health(&self, ctx: &StepContext, name: &str, release: &str, check: &HealthCheck) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        let (inst, mut exit) = {
            let mut st = app.lock();
            let inst = [&st.rec.staged, &st.rec.active]
                .into_iter()
                .flatten()
                .find(|i| i.release == release)
                .cloned()
                .ok_or_else(|| not_started(name, release))?;
            let exit = self.exit_watch(&mut st, &inst);
            (inst, exit)
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(check.deadline_ms);
        let timeout = Duration::from_millis(check.timeout_ms);
        let mut interval = tokio::time::interval(Duration::from_millis(check.interval_ms.max(1)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let exited = |how: String, inst: &Instance| {
            StepError::invalid(format!(
                "{name}@{release} {how} during its health check; the route was not switched. Last lines of its log {}:\n{}",
                inst.log.display(),
                indent(&tail(&inst.log, 15))
            ))
        };
        let mut passes = 0u32;
        let mut probes = 0u32;
        let mut last = String::from("no probe finished");
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                how = exit.wait_for(|e| e.is_some()) => {
                    let how = how.ok().and_then(|h| h.clone()).unwrap_or_else(|| "exited".into());
                    return Err(exited(how, &inst));
                }
            }
            let result = tokio::select! {
                r = probe::probe(&check.probe, inst.port, timeout, &self.cfg.path_prepend, &self.cfg.data_dir) => r,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            probes += 1;
            match result {
                Ok(()) => {
                    passes += 1;
                    if passes >= check.healthy_threshold {
                        return Ok(json!({
                            "release": release, "port": inst.port, "pid": inst.pid,
                            "probes": probes, "elapsed_ms": started.elapsed().as_millis() as u64,
                        }));
                    }
                }
                Err(e) => {
                    passes = 0;
                    last = e;
                }
            }
        }
        if let Some(how) = exit.borrow().clone() {
            return Err(exited(how, &inst));
        }
        let need = if check.healthy_threshold > 1 { format!(" {} times in a row", check.healthy_threshold) } else { String::new() };
        Err(StepError::invalid(format!(
            "{name}@{release} did not pass its health check{need} ({last}) within {}; the route was not switched. Its log is {}",
            human(Duration::from_millis(check.deadline_ms)),
            inst.log.display()
        )))
    }

    pub(super) async fn switch(
        self: &Arc<Self>,
        ctx: &StepContext,
        name: &str,
        release: &str,
        port: u16,
        listen: Option<&str>,
    ) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let _op = app.op.lock().await;
        // Another listen address on the same port: the old listener must go
        // first (0.0.0.0:P and 127.0.0.1:P cannot both be bound).
        let moved = {
            let mut st = app.lock();
            let same_port = |r: &Route| port == 0 || r.port() == port;
            match st.route.as_ref() {
                Some(r) if !r.listens_on(listen) && same_port(r) && st.rec.staged.as_ref().is_some_and(|s| s.release == release) => {
                    Some((st.route.take(), st.rec.route_listen.clone()))
                }
                _ => None,
            }
        };
        let listen_before = match moved {
            Some((r, before)) => {
                if let Some(r) = r {
                    r.close().await;
                }
                Some(before)
            }
            None => None,
        };
        let (old_route, displaced, mut out) = {
            let mut st = app.lock();
            let target = match &st.rec.staged {
                Some(s) if s.release == release => s.clone(),
                _ => match &st.rec.active {
                    // Already switched (a retry after a lost result).
                    Some(a) if a.release == release && st.rec.staged.is_none() => {
                        let route = st.route.as_ref().map(|r| r.port()).or(st.rec.route_port).unwrap_or(0);
                        let at = route_text(st.rec.route_listen.as_deref(), route);
                        return Ok(json!({"route": at, "previous": st.rec.retired, "instance": a}));
                    }
                    _ => return Err(not_started(name, release)),
                },
            };
            let exit = self.exit_watch(&mut st, &target);
            if let Some(how) = exit.borrow().clone() {
                self.relisten(name, &mut st);
                return Err(StepError::invalid(format!(
                    "{} {how} before the route could be switched to it; the route still points at the previous release. Its log is {}",
                    target.label(name),
                    target.log.display()
                )));
            }
            let want = if port != 0 { port } else { st.rec.route_port.unwrap_or(0) };
            let rebind = match &st.route {
                None => true,
                Some(r) => (port != 0 && r.port() != port) || !r.listens_on(listen),
            };
            let mut old_route = None;
            if rebind {
                let r = match Route::bind(name, listen, want, self.conns.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        self.relisten(name, &mut st);
                        return Err(StepError::resource(format!(
                            "cannot listen on {} for {name}'s route: {e}; free that port or set another `port:` (or `route.listen`) in the manifest",
                            route_text(listen, want)
                        )));
                    }
                };
                st.rec.route_listen = listen.map(str::to_string);
                r.set_backend(Some(target.port));
                if st.rec.route_port.is_some_and(|p| p != r.port()) {
                    tracing::warn!(app = name, from = ?st.rec.route_port, to = r.port(), "the route moves to another port");
                }
                st.rec.route_port = Some(r.port());
                old_route = st.route.replace(r);
            } else if let Some(r) = &st.route {
                r.set_backend(Some(target.port));
            }
            let route_port = st.route.as_ref().map(|r| r.port()).unwrap_or(want);
            let at = route_text(st.rec.route_listen.as_deref(), route_port);
            let displaced = st.rec.retired.take();
            let previous = st.rec.active.take();
            st.rec.retired = previous.clone();
            st.rec.active = Some(target.clone());
            st.rec.staged = None;
            self.persist(&st)?;
            tracing::info!(app = name, release, route = %at, backend = target.port, "route switched");
            (old_route, displaced, json!({"route": at, "previous": previous, "instance": target}))
        };
        if let Some(before) = listen_before {
            // Its undo listens there again.
            out["listen_before"] = json!(before.unwrap_or_else(|| "127.0.0.1".into()));
        }
        if let Some(r) = old_route {
            r.close().await;
        }
        if let Some(d) = displaced {
            // A retired instance left by an earlier deployment that never
            // stopped it: nothing routes to it any more.
            tracing::info!(app = name, release = %d.release, pid = d.pid, "stopping an older retired instance");
            self.conns.of(d.port).drained(self.cfg.stop_grace).await;
            self.stop_instance(&app, &d).await?;
        }
        Ok(out)
    }

    pub(super) async fn undo_switch(&self, ctx: &StepContext, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"active": null})) };
        let parse = |k: &str| -> Result<Option<Instance>, StepError> {
            match output.and_then(|o| o.get(k)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                    StepError::invalid(format!(
                        "the switch step's recorded output has an unreadable `{k}` ({e}); the route was left as it is"
                    ))
                }),
            }
        };
        let previous = parse("previous")?;
        let Some(instance) = parse("instance")? else {
            return Err(StepError::invalid("the switch step's recorded output names no instance; the route was left as it is"));
        };
        let _op = app.op.lock().await;
        // The switch moved the route to another listen address: back to the old one.
        if let Some(before) = output.and_then(|o| o.get("listen_before")).and_then(Value::as_str) {
            let moving = {
                let mut st = app.lock();
                let before = Some(before).filter(|b| *b != "127.0.0.1");
                let r = st.route.take_if(|r| !r.listens_on(before));
                if r.is_some() {
                    st.rec.route_listen = before.map(str::to_string);
                }
                r
            };
            if let Some(r) = moving {
                r.close().await;
            }
        }
        let closing = {
            let mut st = app.lock();
            let active = st.rec.active.clone();
            let in_effect = active.as_ref().is_some_and(|a| a.same(&instance));
            if !in_effect {
                let undone = match (&active, &previous) {
                    (Some(a), Some(p)) => a.same(p),
                    (None, None) => true,
                    _ => false,
                };
                if undone {
                    return Ok(json!({"active": active}));
                }
                return Err(StepError::invalid(format!(
                    "{name}'s route now points at {}, not at {}@{}; another deployment changed it since, so it was left as it is",
                    active.map(|a| a.label(name)).unwrap_or_else(|| "nothing".into()),
                    instance.release,
                    instance.port
                )));
            }
            let current = active.unwrap_or(instance);
            let mut closing = None;
            match &previous {
                Some(p) => {
                    let back = st.rec.retired.clone().filter(|r| r.same(p));
                    let Some(back) = back else {
                        return Err(StepError::invalid(format!(
                            "cannot point {name}'s route back at {}: that instance is not running any more; undo `stop-old` first (it starts it again)",
                            p.label(name)
                        )));
                    };
                    let exit = self.exit_watch(&mut st, &back);
                    if let Some(how) = exit.borrow().clone() {
                        return Err(StepError::invalid(format!(
                            "cannot point {name}'s route back at {}: it {how}; undo `stop-old` first (it starts it again)",
                            back.label(name)
                        )));
                    }
                    match &st.route {
                        Some(r) => r.set_backend(Some(back.port)),
                        None => {
                            let port = st.rec.route_port.unwrap_or(0);
                            let listen = st.rec.route_listen.clone();
                            let r = Route::bind(name, listen.as_deref(), port, self.conns.clone()).map_err(|e| {
                                StepError::resource(format!(
                                    "cannot listen on {} for {name}'s route: {e}; free that port",
                                    route_text(listen.as_deref(), port)
                                ))
                            })?;
                            r.set_backend(Some(back.port));
                            st.route = Some(r);
                        }
                    }
                    st.rec.active = Some(back);
                    st.rec.retired = None;
                }
                None => {
                    closing = st.route.take();
                    st.rec.active = None;
                }
            }
            st.rec.staged = Some(current);
            self.persist(&st)?;
            tracing::info!(app = name, back_to = ?st.rec.active.as_ref().map(|a| &a.release), "route switched back");
            closing
        };
        if let Some(r) = closing {
            r.close().await;
        }
        let st = app.lock();
        Ok(json!({"active": st.rec.active}))
    }

    pub(super) async fn stop_old(&self, ctx: &StepContext, name: &str, drain_ms: u64) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let Some(old) = app.lock().rec.retired.clone() else { return Ok(json!({"stopped": null})) };
        let open = self.conns.of(old.port).drained(Duration::from_millis(drain_ms)).await;
        if open > 0 {
            tracing::info!(app = name, release = %old.release, open, "connections still open after the drain time; stopping anyway");
        }
        self.stop_instance(&app, &old).await?;
        let mut st = app.lock();
        if st.rec.retired.as_ref().is_some_and(|r| r.same(&old)) {
            st.rec.retired = None;
        }
        self.persist(&st)?;
        Ok(json!({"stopped": old, "open_connections_cut": open}))
    }

    pub(super) async fn undo_stop_old(self: &Arc<Self>, ctx: &StepContext, name: &str, output: Option<&Value>) -> Result<Value, StepError> {
        let stopped: Option<Instance> = match output.and_then(|o| o.get("stopped")) {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                StepError::invalid(format!("the stop-old step's recorded output is unreadable ({e}); nothing was restarted"))
            })?),
        };
        let Some(old) = stopped else { return Ok(json!({"restarted": null})) };
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        let (inst, mut exit, fresh) = {
            let mut st = app.lock();
            let existing = st.rec.retired.clone().filter(|r| r.same(&old));
            // A fresh watch of a pid has not looked yet: ask the kernel too,
            // or an instance stopped earlier (recreate's stop-current keeps
            // it recorded as retired) would pass for running.
            let running = existing.filter(|r| {
                let w = self.exit_watch(&mut st, r);
                let up = w.borrow().is_none() && crate::proc::alive(r.pid, r.proc_start);
                up
            });
            match running {
                Some(r) => {
                    let w = self.exit_watch(&mut st, &r);
                    (r, w, false)
                }
                None => {
                    let clash = [&st.rec.active, &st.rec.staged].into_iter().flatten().find(|i| i.port == old.port).cloned();
                    if let Some(c) = clash {
                        return Err(StepError::invalid(format!(
                            "cannot start {name}@{} again on port {}: {} uses that port now",
                            old.release,
                            old.port,
                            c.label(name)
                        )));
                    }
                    let inst = self.launch(&ctx.destination, name, &mut st, &old)?;
                    st.rec.retired = Some(inst.clone());
                    self.persist(&st)?;
                    let w = self.exit_watch(&mut st, &inst);
                    (inst, w, true)
                }
            }
        };
        let deadline = tokio::time::Instant::now() + self.cfg.restore_wait;
        let mut wait = Duration::from_millis(20);
        loop {
            let answers = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, inst.port)).await.is_ok();
            // Another process may have taken the port while the old
            // release was stopped: then the port answers at once and the
            // instance started again exits, unable to bind. So a fresh
            // instance counts as back only once it outlived the exit grace.
            let exited = if answers && fresh { proc::wait_exit(&mut exit, self.cfg.exit_grace).await } else { exit.borrow().clone() };
            if answers && exited.is_none() {
                return Ok(json!({"restarted": inst}));
            }
            if let Some(how) = exited {
                let mut st = app.lock();
                if st.rec.retired.as_ref().is_some_and(|r| r.same(&inst)) {
                    st.rec.retired = None;
                    self.persist(&st)?;
                }
                let log_tail = tail(&inst.log, 15);
                let taken = if answers || ports::says_port_in_use(&log_tail) {
                    format!(
                        "; another process holds port {} now, so the old release cannot come back where it ran (`ss -ltnp 'sport = :{}'` shows which)",
                        inst.port, inst.port
                    )
                } else {
                    String::new()
                };
                return Err(StepError::invalid(format!(
                    "{name}@{} {how} when started again on port {}{taken}; last lines of its log {}:\n{}",
                    inst.release,
                    inst.port,
                    inst.log.display(),
                    indent(&log_tail)
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::transient(format!(
                    "{} was started again but its port {} did not accept connections within {}; its log is {}",
                    inst.label(name),
                    inst.port,
                    human(self.cfg.restore_wait),
                    inst.log.display()
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = exit.changed() => {}
            }
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Is `release` of `name` already started for this deployment? Yes
    /// when the staged instance is that release, was started with this
    /// token and still runs: the output is the one `start` returned.
    pub(super) async fn check_start(&self, ctx: &StepContext, name: &str, release: &str) -> Option<Value> {
        let app = self.existing(&ctx.destination, name)?;
        let _op = app.op.lock().await;
        let st = app.lock();
        let inst = st.rec.staged.as_ref().filter(|s| s.release == release && s.token == ctx.token)?;
        let exited = st.procs.get(&inst.pid).is_some_and(|w| w.borrow().is_some());
        if exited || !proc::alive(inst.pid, inst.proc_start) {
            return None;
        }
        Some(json!({"port": inst.port, "pid": inst.pid, "release": inst.release}))
    }

    /// Stop every staged instance of `destination` started with `token`:
    /// nothing routes to it. Active (and retired) instances, and other
    /// destinations' instances, are left alone.
    pub(super) async fn forget(&self, destination: &str, token: u64) -> Vec<String> {
        let apps: Vec<Arc<App>> =
            self.apps.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|a| a.destination == destination).cloned().collect();
        let mut removed = Vec::new();
        for app in apps {
            let _op = app.op.lock().await;
            let staged = app.lock().rec.staged.clone();
            let Some(inst) = staged.filter(|s| s.token == token) else { continue };
            if let Err(e) = self.stop_instance(&app, &inst).await {
                tracing::warn!(app = %app.name, error = %e, "could not stop a staged instance of a forgotten deployment; stop it by hand (kill its process group)");
                continue;
            }
            let mut st = app.lock();
            if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
                st.rec.staged = None;
            }
            if let Err(e) = self.persist(&st) {
                tracing::warn!(app = %app.name, error = %e, "the stopped staged instance is still recorded; a restarted node forgets it as not running");
            }
            removed.push(format!("stopped staged {}", inst.label(&app.name)));
        }
        removed
    }

    pub(super) async fn cancelled_start(&self, ctx: &StepContext, name: &str, release: &str) {
        let Some(app) = self.existing(&ctx.destination, name) else { return };
        let _op = app.op.lock().await;
        let staged = app.lock().rec.staged.clone();
        let Some(inst) = staged.filter(|s| s.release == release && s.token == ctx.token) else { return };
        tracing::info!(app = name, release, pid = inst.pid, "stopping the instance an interrupted start left behind");
        if let Err(e) = self.stop_instance(&app, &inst).await {
            tracing::warn!(app = name, error = %e, "could not stop it");
        }
        let mut st = app.lock();
        if st.rec.staged.as_ref().is_some_and(|s| s.same(&inst)) {
            st.rec.staged = None;
        }
        if let Err(e) = self.persist(&st) {
            tracing::warn!(app = name, error = %e, "could not record it");
        }
    }
}
fn not_started(app: &str, release: &str) -> StepError {
    StepError::invalid(format!(
        "no instance of {app}@{release} is running on this node (it was not started here, or it was stopped); the start step must run first"
    ))
}

/// `recreate` and the canary's analysis.
impl Inner {
    /// A switch that closed the route to move it to another address failed
    /// before it could listen there: listen where it did, on the active
    /// instance, again.
    fn relisten(&self, name: &str, st: &mut super::state::AppState) {
        let (Some(port), Some(active), None) = (st.rec.route_port, st.rec.active.clone(), st.route.as_ref()) else { return };
        match Route::bind(name, st.rec.route_listen.as_deref(), port, self.conns.clone()) {
            Ok(r) => {
                r.set_backend(Some(active.port));
                st.route = Some(r);
            }
            Err(e) => tracing::warn!(app = name, port, error = %e, "cannot listen on the route again; the next switch binds it"),
        }
    }

    /// `recreate`: stop the active instance before the new one starts. It
    /// moves to the retired slot (stopped), so a retry finds it there and
    /// answers the same output; the route stays, with no backend, until the
    /// switch.
    pub(super) async fn stop_current(&self, ctx: &StepContext, name: &str, drain_ms: u64) -> Result<Value, StepError> {
        let Some(app) = self.existing(&ctx.destination, name) else { return Ok(json!({"stopped": null})) };
        let _op = app.op.lock().await;
        let current = {
            let mut st = app.lock();
            match st.rec.active.take() {
                Some(a) => {
                    if let Some(r) = &st.route {
                        r.set_backend(None);
                    }
                    st.rec.retired = Some(a.clone());
                    self.persist(&st)?;
                    Some(a)
                }
                // A retry: the stopped instance is still recorded as retired.
                None => st.rec.retired.clone(),
            }
        };
        let Some(old) = current else { return Ok(json!({"stopped": null})) };
        let open = self.conns.of(old.port).drained(Duration::from_millis(drain_ms)).await;
        self.stop_instance(&app, &old).await?;
        tracing::info!(app = name, release = %old.release, "current instance stopped (recreate)");
        Ok(json!({"stopped": old, "open_connections_cut": open}))
    }

    /// Undo of `stop_current`: start the stopped release again on its port
    /// (as undoing `stop-old` does) and point the route back at it.
    pub(super) async fn undo_stop_current(
        self: &Arc<Self>,
        ctx: &StepContext,
        name: &str,
        output: Option<&Value>,
    ) -> Result<Value, StepError> {
        let restarted = self.undo_stop_old(ctx, name, output).await?;
        let Some(inst) = restarted.get("restarted").filter(|v| !v.is_null()) else { return Ok(restarted) };
        let inst: Instance = serde_json::from_value(inst.clone())
            .map_err(|e| StepError::invalid(format!("the restarted instance is not readable ({e}); the route was left as it is")))?;
        let app = self.app(&ctx.destination, name);
        let _op = app.op.lock().await;
        let mut st = app.lock();
        match &st.rec.active {
            Some(a) if a.same(&inst) => return Ok(json!({"restarted": inst})),
            Some(a) => {
                return Err(StepError::invalid(format!(
                    "{name}'s route now points at {}; another deployment changed it since, so {} was started again but not routed to",
                    a.label(name),
                    inst.label(name)
                )))
            }
            None => {}
        }
        if st.rec.retired.as_ref().is_some_and(|r| r.same(&inst)) {
            st.rec.retired = None;
        }
        st.rec.active = Some(inst.clone());
        match (&st.route, st.rec.route_port) {
            (Some(r), _) => r.set_backend(Some(inst.port)),
            (None, Some(port)) => {
                let listen = st.rec.route_listen.clone();
                let r = Route::bind(name, listen.as_deref(), port, self.conns.clone()).map_err(|e| {
                    StepError::resource(format!(
                        "cannot listen on {} for {name}'s route: {e}; free that port",
                        route_text(listen.as_deref(), port)
                    ))
                })?;
                r.set_backend(Some(inst.port));
                st.route = Some(r);
            }
            (None, None) => {}
        }
        self.persist(&st)?;
        tracing::info!(app = name, release = %inst.release, "route points at the restarted instance again (recreate undone)");
        Ok(json!({"restarted": inst}))
    }

    /// The canary's analysis against its instance of `release` here.
    pub(super) async fn analyze(
        &self,
        ctx: &StepContext,
        name: &str,
        release: &str,
        analysis: &fleet_core::manifest::Analysis,
        pause_ms: u64,
    ) -> Result<Value, StepError> {
        let app = self.existing(&ctx.destination, name).ok_or_else(|| not_started(name, release))?;
        let port = {
            let st = app.lock();
            st.rec.active.as_ref().filter(|a| a.release == release).map(|a| a.port).ok_or_else(|| not_started(name, release))?
        };
        let label = format!("{name}@{release}");
        crate::canary::analyze(&label, analysis, port, Duration::from_millis(pause_ms), &self.cfg.path_prepend, &self.cfg.data_dir).await
    }
}
