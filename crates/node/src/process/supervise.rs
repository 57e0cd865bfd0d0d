//! Supervision of the app instances on this node: launching an instance
//! and watching it exit, stopping one, adopting the instances a previous
//! `fleet-node` left running, restarting a crashed active instance on its
//! port, and listening on a route port again once it is free.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::proxy::Route;
use super::state::{App, AppRecord, AppState, Instance};
use super::Inner;
use crate::adapter::StepError;
use crate::proc::{self, ExitWatch};

impl Inner {
    /// Spawn `tmpl` (its pid is ignored) and watch it. Synchronous, so the
    /// caller records the instance under the same lock it spawned it.
    pub(super) fn launch(
        self: &Arc<Self>,
        destination: &str,
        app: &str,
        st: &mut AppState,
        tmpl: &Instance,
    ) -> Result<Instance, StepError> {
        let Some(first) = tmpl.argv.first() else {
            return Err(StepError::invalid(format!("{app}@{}: `run` is empty; give the command that starts one instance", tmpl.release)));
        };
        let program = proc::resolve_program(first, &self.cfg.path_prepend).map_err(|e| {
            StepError::invalid(format!(
                "cannot start {app}@{}: {e}; install it on this node or give its full path in the manifest's `run`",
                tmpl.release
            ))
        })?;
        let mut env = tmpl.env.clone();
        env.insert("PORT".into(), tmpl.port.to_string());
        env.insert("FLEET_APP".into(), app.to_string());
        env.insert("FLEET_RELEASE".into(), tmpl.release.clone());
        env.insert("FLEET_TOKEN".into(), tmpl.token.to_string());
        let child = proc::spawn(proc::Spawn {
            program: &program,
            args: &tmpl.argv[1..],
            env: &env,
            path_prepend: &self.cfg.path_prepend,
            cwd: &self.cfg.data_dir,
            log: &tmpl.log,
            kill_on_drop: false,
        })
        .map_err(|e| StepError::invalid(format!("cannot start {app}@{} (`{}`): {e}", tmpl.release, tmpl.argv.join(" "))))?;
        let Some(pid) = child.id() else {
            return Err(StepError::transient(format!("{app}@{} exited before its pid could be read; try again", tmpl.release)));
        };
        let weak = Arc::downgrade(self);
        let key = (destination.to_string(), app.to_string());
        let exit = proc::watch_child(child, move |how| on_exit(weak, key, pid, how));
        st.procs.insert(pid, exit);
        let inst = Instance { pid, proc_start: proc::proc_start_time(pid), ..tmpl.clone() };
        tracing::info!(app, destination, release = %inst.release, pid, port = inst.port, log = %inst.log.display(), "instance started");
        Ok(inst)
    }

    /// The exit watch of `inst`, creating a `/proc` poller for a process
    /// that is not (or no longer) our child.
    pub(super) fn exit_watch(&self, st: &mut AppState, inst: &Instance) -> ExitWatch {
        if let Some(w) = st.procs.get(&inst.pid) {
            return w.clone();
        }
        let w = proc::watch_pid(inst.pid, inst.proc_start, |_| {});
        st.procs.insert(inst.pid, w.clone());
        w
    }

    /// Stop `inst` (SIGTERM to its group, SIGKILL after the grace) and
    /// wait until it is gone. Already gone is fine.
    pub(super) async fn stop_instance(&self, app: &App, inst: &Instance) -> Result<(), StepError> {
        let exit = {
            let mut st = app.lock();
            if !st.procs.contains_key(&inst.pid) && !proc::alive(inst.pid, inst.proc_start) {
                return Ok(());
            }
            st.stopping.insert(inst.pid);
            self.exit_watch(&mut st, inst)
        };
        let r = proc::stop(inst.pid, exit, self.cfg.stop_grace).await;
        match r {
            Ok(how) => {
                let mut st = app.lock();
                st.procs.remove(&inst.pid);
                st.stopping.remove(&inst.pid);
                drop(st);
                tracing::info!(app = %app.name, release = %inst.release, pid = inst.pid, port = inst.port, "instance stopped ({how})");
                Ok(())
            }
            Err(e) => Err(StepError::resource(format!("cannot stop {}: {e}", inst.label(&app.name)))),
        }
    }

    pub(super) fn adopt(self: &Arc<Self>, rec: AppRecord) {
        let app = self.app(&rec.destination, &rec.app);
        let mut st = app.lock();
        st.rec = rec;
        let mut restart = None;
        for slot in ["active", "staged", "retired"] {
            let inst = match slot {
                "active" => st.rec.active.clone(),
                "staged" => st.rec.staged.clone(),
                _ => st.rec.retired.clone(),
            };
            let Some(inst) = inst else { continue };
            if proc::alive(inst.pid, inst.proc_start) {
                let weak = Arc::downgrade(self);
                let key = (app.destination.clone(), app.name.clone());
                let pid = inst.pid;
                let w = proc::watch_pid(pid, inst.proc_start, move |how| on_exit(weak, key, pid, how));
                st.procs.insert(pid, w);
                tracing::info!(app = %app.name, slot, release = %inst.release, pid, port = inst.port, "adopted a running instance");
            } else if slot == "active" {
                tracing::warn!(app = %app.name, release = %inst.release, pid = inst.pid, "the active instance is no longer running; restarting it");
                restart = Some(inst);
            } else {
                tracing::warn!(app = %app.name, slot, release = %inst.release, pid = inst.pid, "a recorded instance is no longer running; forgetting it");
                match slot {
                    "staged" => st.rec.staged = None,
                    _ => st.rec.retired = None,
                }
            }
        }
        if let (Some(port), Some(active)) = (st.rec.route_port, st.rec.active.clone()) {
            match Route::bind(&app.name, st.rec.route_listen.as_deref(), port, self.conns.clone()) {
                Ok(r) => {
                    r.set_backend(Some(active.port));
                    tracing::info!(app = %app.name, port, backend = active.port, "route listening again");
                    st.route = Some(r);
                }
                Err(e) => {
                    tracing::error!(app = %app.name, port, error = %e, "cannot listen on the route port again; will keep trying");
                    tokio::spawn(rebind_route(Arc::downgrade(self), (app.destination.clone(), app.name.clone()), port));
                }
            }
        }
        if let Err(e) = self.persist(&st) {
            tracing::warn!(app = %app.name, error = %e, "cannot record the adopted state");
        }
        drop(st);
        if let Some(inst) = restart {
            tokio::spawn(restart_active(Arc::downgrade(self), (app.destination.clone(), app.name.clone()), inst.pid, Duration::ZERO));
        }
    }
}

/// (destination, app).
type Key = (String, String);

/// A process of `app` exited: if it was the active instance, restart it.
fn on_exit(weak: Weak<Inner>, key: Key, pid: u32, how: String) {
    let Some(inner) = weak.upgrade() else { return };
    if inner.closed.load(Ordering::SeqCst) {
        return;
    }
    let Some(a) = inner.existing(&key.0, &key.1) else { return };
    let app = &key.1;
    let st = a.lock();
    if st.stopping.contains(&pid) {
        return;
    }
    let active = st.rec.active.as_ref().is_some_and(|i| i.pid == pid);
    if active {
        let delay = Duration::from_millis(100);
        tracing::warn!(app, pid, "the active instance {how} unexpectedly; restarting it on the same port");
        drop(st);
        tokio::spawn(restart_active(weak, key.clone(), pid, delay));
    } else if st.rec.staged.as_ref().is_some_and(|i| i.pid == pid) {
        tracing::warn!(app, pid, "a staged instance {how}; it is not restarted (the health check fails)");
    } else {
        tracing::debug!(app, pid, "process {how}");
    }
}

/// Restart the active instance of `app` (whose dead pid was `dead_pid`) on
/// its port, with a growing pause between attempts (at most
/// `restart_max_backoff`).
pub(super) async fn restart_active(weak: Weak<Inner>, key: Key, dead_pid: u32, first_delay: Duration) {
    let (destination, app) = (&key.0, &key.1);
    let mut delay = first_delay;
    loop {
        let (wait, max) = {
            let Some(inner) = weak.upgrade() else { return };
            let Some(a) = inner.existing(destination, app) else { return };
            let mut st = a.lock();
            if st.last_restart.is_some_and(|t| t.elapsed() > Duration::from_secs(30)) {
                st.restarts = 0;
            }
            let grow = Duration::from_millis(200).saturating_mul(1u32 << st.restarts.min(8));
            st.restarts += 1;
            st.last_restart = Some(Instant::now());
            (delay.max(grow).min(inner.cfg.restart_max_backoff), inner.cfg.restart_max_backoff)
        };
        tokio::time::sleep(wait).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(a) = inner.existing(destination, app) else { return };
        let mut st = a.lock();
        let Some(active) = st.rec.active.clone().filter(|i| i.pid == dead_pid) else { return };
        match inner.launch(destination, app, &mut st, &active) {
            Ok(new) => {
                tracing::warn!(app, release = %new.release, pid = new.pid, port = new.port, "the active instance was restarted");
                st.procs.remove(&dead_pid);
                st.rec.active = Some(new);
                if let Err(e) = inner.persist(&st) {
                    tracing::warn!(app, error = %e, "cannot record the restarted instance");
                }
                return;
            }
            Err(e) => {
                tracing::error!(app, error = %e, "cannot restart the active instance; trying again");
                delay = (wait * 2).min(max);
            }
        }
    }
}

/// After a node restart the route port was busy: keep trying to listen.
async fn rebind_route(weak: Weak<Inner>, key: Key, port: u16) {
    let (destination, app) = (&key.0, &key.1);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(a) = inner.existing(destination, app) else { return };
        let mut st = a.lock();
        if st.route.is_some() || st.rec.route_port != Some(port) {
            return;
        }
        let Some(active) = st.rec.active.clone() else { return };
        if let Ok(r) = Route::bind(app, st.rec.route_listen.as_deref(), port, inner.conns.clone()) {
            r.set_backend(Some(active.port));
            tracing::info!(app, port, "route listening again");
            st.route = Some(r);
            return;
        }
    }
}
