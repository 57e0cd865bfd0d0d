//! The routes of the HTTP API. Each `/api` handler checks what only HTTP
//! has (path, query, body), then makes the `Control` call `fleetctl` would
//! make, for the same caller, through [`Forwarder::call`]: roles, request
//! ids, validation and state are the gRPC service's.
//!
//! [`Forwarder::call`]: super::forward::Forwarder::call

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use fleet_core::deploy::{DeployState, Deployment};
use fleet_core::manifest::{parse_manifest, Overrides, MAX_DOCUMENT_BYTES};
use fleet_core::views::{DestinationView, NodeView, ServerView};
use fleet_proto::control_server::Control;
use fleet_proto::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::auth::Caller;
use super::error::{ApiError, Code, Errors};
use super::HttpApi;
use crate::tls::KnownCaller;

/// The largest request body: a manifest at its limit, JSON-escaped, with room.
pub const MAX_BODY_BYTES: usize = 2 * MAX_DOCUMENT_BYTES + 64 * 1024;
/// Lists answer at most this many records.
const MAX_LIST_LIMIT: u32 = 1000;

type ApiResult<T> = Result<T, ApiError>;

pub fn router(api: HttpApi) -> Router {
    Router::new()
        .route("/api/apps/{app}/deployments", post(submit))
        .route("/api/deployments", get(list_deployments))
        .route("/api/deployments/{id}", get(get_deployment))
        .route("/api/deployments/{id}/cancel", put(cancel))
        .route("/api/deployments/{id}/rollback", put(rollback))
        .route("/api/deployments/{id}/promote", put(promote))
        .route("/api/audit", get(audit))
        .route("/api/whoami", get(whoami))
        .route("/api/openapi.json", get(openapi))
        .route("/api/destinations", get(destinations))
        .route("/api/destinations/{id}/servers", get(servers))
        .route("/api/locks", get(locks))
        .route("/api/nodes", get(nodes))
        .route("/api/cluster", get(cluster))
        .route("/api/events", get(events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(super::dashboard::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

/// Read access without a `Control` call (health, metrics, events).
fn may_read(c: &KnownCaller, what: &str) -> ApiResult<()> {
    if !fleet_core::auth::allows(c.role, fleet_core::auth::Access::Read) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Forbidden,
            format!("{what} needs a viewer or operator certificate or token; `{}` is a `{}`", c.name, c.role),
        ));
    }
    Ok(())
}

fn body<T: DeserializeOwned + Default>(bytes: Result<Bytes, BytesRejection>) -> ApiResult<T> {
    let bytes = bytes.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::BodyTooLarge,
            format!("the request body is larger than {MAX_BODY_BYTES} bytes; send a smaller manifest"),
        ),
        _ => ApiError::field("body", format!("cannot read the request body: {}", e.body_text())),
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { "body".to_string() } else { path };
        ApiError::field(field, format!("the request body is not valid: {}", e.inner()))
    })
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::field("query", format!("{}; the parameters are listed in the README's HTTP API section", e.body_text())))
}

fn name_field(field: &'static str, value: &str) -> ApiResult<()> {
    fleet_core::names::validate_name(field, value).map_err(|e| ApiError::field(field, e.to_string()))
}

fn deployment_of(json: &str) -> ApiResult<Deployment> {
    serde_json::from_str(json).map_err(|e| ApiError::internal(format!("a deployment record does not parse: {e}")))
}

/// A request id for a write: the client's (body `request_id`, so a client
/// retrying the same write is answered once), else a fresh one, so that a
/// call forwarded again after a leader change is applied once.
fn request_id(given: &str) -> String {
    if given.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        given.to_string()
    }
}

// ---------------------------------------------------------------- writes

/// `POST /api/apps/{app}/deployments`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitBody {
    /// The manifest (`fleet.yaml`) as text.
    manifest: String,
    release: String,
    destinations: Vec<String>,
    timeout_ms: u64,
    lock_wait_ms: u64,
    idempotency_key: String,
    request_id: String,
    dry_run: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub id: String,
    pub url: String,
    #[schema(value_type = String)]
    pub state: DeployState,
    pub applied_index: u64,
    /// The deployment record (as `fleetctl status ID -o json`).
    #[schema(value_type = Object)]
    pub deployment: Deployment,
}

#[utoipa::path(post, path = "/api/apps/{app}/deployments", tag = "deployments",
    params(("app" = String, Path, description = "The app the manifest deploys (its `app:`)", example = "web")),
    request_body = SubmitBody,
    responses(
        (status = 202, description = "Accepted: queued or running; follow it at `url` or on /api/events", body = Accepted,
            headers(("Location" = String, description = "The deployment's URL"))),
        (status = 200, description = "A dry run: the plan, nothing submitted", body = Accepted),
        Errors))]
async fn submit(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    app: Result<Path<String>, axum::extract::rejection::PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let Path(app) = app.map_err(|e| ApiError::field("app", e.body_text()))?;
    name_field("app", &app)?;
    let b: SubmitBody = body(bytes)?;
    if b.manifest.trim().is_empty() {
        return Err(ApiError::field("manifest", "missing; send the text of fleet.yaml as `manifest`"));
    }
    if !b.release.is_empty() {
        name_field("release", &b.release)?;
    }
    // The coordinator validates again; here to name the field in the answer.
    let overrides =
        Overrides { release: (!b.release.is_empty()).then(|| b.release.clone()), destinations: b.destinations.clone(), timeout_ms: None };
    let spec = parse_manifest("manifest", &b.manifest, &overrides).map_err(|e| ApiError::manifest(&e))?;
    if spec.app != app {
        return Err(ApiError::field(
            "app",
            format!("the URL names app `{app}` but the manifest deploys `{}`; use /api/apps/{}/deployments", spec.app, spec.app),
        ));
    }
    let msg = SubmitDeploymentRequest {
        manifest_yaml: b.manifest,
        file_name: "manifest".into(),
        release: b.release,
        destinations: b.destinations,
        dry_run: b.dry_run,
        timeout_ms: b.timeout_ms,
        lock_wait_ms: b.lock_wait_ms,
        idempotency_key: b.idempotency_key,
        request_id: request_id(&b.request_id),
    };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::submit_deployment(&*c, r).await },
            |mut c, r| async move { c.submit_deployment(r).await },
        )
        .await?;
    let d = deployment_of(&r.deployment_json)?;
    let url = format!("/api/deployments/{}", d.id);
    let status = if b.dry_run { StatusCode::OK } else { StatusCode::ACCEPTED };
    tracing::info!(deployment = %d.id, actor = %caller.name, from = %caller.from, "deployment submitted over HTTP");
    let accepted = Accepted { id: d.id.clone(), url: url.clone(), state: d.state, applied_index: r.applied_index, deployment: d };
    Ok((status, [(header::LOCATION, url)], Json(accepted)).into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CancelBody {
    reason: String,
    request_id: String,
}

#[utoipa::path(put, path = "/api/deployments/{id}/cancel", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id, e.g. d12", example = "d1")),
    request_body(content = Option<CancelBody>),
    responses((status = 200, description = "Cancelling: the step in flight finishes, then completed steps are undone", body = DeploymentAnswer), Errors))]
async fn cancel(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DeploymentAnswer>> {
    let b: CancelBody = body(bytes)?;
    if !b.reason.is_empty() {
        fleet_core::names::validate_text("reason", &b.reason, fleet_core::names::MAX_REASON_LEN)
            .map_err(|e| ApiError::field("reason", e.to_string()))?;
    }
    let msg = CancelDeploymentRequest { id, reason: b.reason, request_id: request_id(&b.request_id) };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::cancel_deployment(&*c, r).await },
            |mut c, r| async move { c.cancel_deployment(r).await },
        )
        .await?;
    answer(r)
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackBody {
    to_release: String,
    timeout_ms: u64,
    request_id: String,
}

#[utoipa::path(put, path = "/api/deployments/{id}/rollback", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id, e.g. d12", example = "d1")),
    request_body(content = Option<RollbackBody>),
    responses((status = 202, description = "A new deployment of the earlier release", body = Accepted,
        headers(("Location" = String, description = "The new deployment's URL"))), Errors))]
async fn rollback(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let b: RollbackBody = body(bytes)?;
    if !b.to_release.is_empty() {
        name_field("to_release", &b.to_release)?;
    }
    let msg = RollbackDeploymentRequest { id, to_release: b.to_release, timeout_ms: b.timeout_ms, request_id: request_id(&b.request_id) };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::rollback_deployment(&*c, r).await },
            |mut c, r| async move { c.rollback_deployment(r).await },
        )
        .await?;
    let d = deployment_of(&r.deployment_json)?;
    let url = format!("/api/deployments/{}", d.id);
    let accepted = Accepted { id: d.id.clone(), url: url.clone(), state: d.state, applied_index: r.applied_index, deployment: d };
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, url)], Json(accepted)).into_response())
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PromoteBody {
    request_id: String,
}

#[utoipa::path(put, path = "/api/deployments/{id}/promote", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id of a paused canary, e.g. d12", example = "d1")),
    request_body(content = Option<PromoteBody>),
    responses((status = 200, description = "The canary goes on to the other nodes", body = DeploymentAnswer), Errors))]
/// `PUT /api/deployments/{id}/promote`: a paused canary continues.
async fn promote(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    Path(id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<DeploymentAnswer>> {
    let b: PromoteBody = body(bytes)?;
    let msg = PromoteDeploymentRequest { id, request_id: request_id(&b.request_id) };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::promote_deployment(&*c, r).await },
            |mut c, r| async move { c.promote_deployment(r).await },
        )
        .await?;
    answer(r)
}

// ----------------------------------------------------------------- reads

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentAnswer {
    pub applied_index: u64,
    #[schema(value_type = Object)]
    pub deployment: Deployment,
}

fn answer(r: DeploymentReply) -> ApiResult<Json<DeploymentAnswer>> {
    Ok(Json(DeploymentAnswer { applied_index: r.applied_index, deployment: deployment_of(&r.deployment_json)? }))
}

#[utoipa::path(get, path = "/api/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id, e.g. d12", example = "d1")),
    responses((status = 200, description = "The deployment: steps, events, state", body = DeploymentAnswer), Errors))]
async fn get_deployment(State(api): State<HttpApi>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<DeploymentAnswer>> {
    let msg = GetDeploymentRequest { id };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::get_deployment(&*c, r).await },
            |mut c, r| async move { c.get_deployment(r).await },
        )
        .await?;
    answer(r)
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, default)]
pub struct ListQuery {
    app: String,
    destination: String,
    state: String,
    /// 1 to 1000; default 50.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only deployments older than this one (`d42`): the `next_before` of the previous page.
    before: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentList {
    pub applied_index: u64,
    /// Newest first.
    #[schema(value_type = Vec<Object>)]
    pub deployments: Vec<Deployment>,
    /// Pass as `before` for the next (older) page; absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

#[utoipa::path(get, path = "/api/deployments", tag = "deployments", params(ListQuery),
    responses((status = 200, description = "Deployments, newest first", body = DeploymentList), Errors))]
async fn list_deployments(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<DeploymentList>> {
    let q = query(q)?;
    if !q.app.is_empty() {
        name_field("app", &q.app)?;
    }
    if !q.destination.is_empty() {
        name_field("destination", &q.destination)?;
    }
    if !q.state.is_empty() {
        serde_json::from_value::<DeployState>(serde_json::Value::String(q.state.clone())).map_err(|_| {
            ApiError::field(
                "state",
                format!("`{}` is not a deployment state; use queued, running, compensating, failed, cancelling, cancelled, succeeded, compensation_failed or superseded", q.state),
            )
        })?;
    }
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::field("limit", format!("must be 1 to {MAX_LIST_LIMIT}")));
    }
    if !q.before.is_empty() && fleet_core::state::deployment_number(&q.before).is_none() {
        return Err(ApiError::field(
            "before",
            format!("`{}` is not a deployment id (d42); pass the `next_before` of the previous page", q.before),
        ));
    }
    let msg = ListDeploymentsRequest { app: q.app, destination: q.destination, limit, state: q.state, before: q.before };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::list_deployments(&*c, r).await },
            |mut c, r| async move { c.list_deployments(r).await },
        )
        .await?;
    let deployments = r.deployments_json.iter().map(|j| deployment_of(j)).collect::<ApiResult<Vec<_>>>()?;
    let next_before = (!r.next_before.is_empty()).then_some(r.next_before);
    Ok(Json(DeploymentList { applied_index: r.applied_index, deployments, next_before }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DestinationList {
    pub applied_index: u64,
    #[schema(value_type = Vec<Object>)]
    pub destinations: Vec<DestinationView>,
}

async fn destination_views(api: &HttpApi, caller: &KnownCaller) -> ApiResult<DestinationList> {
    let r = api
        .forward
        .call(
            caller,
            ListDestinationsRequest::default(),
            |c, r| async move { Control::list_destinations(&*c, r).await },
            |mut c, r| async move { c.list_destinations(r).await },
        )
        .await?;
    let destinations = r
        .destinations_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| ApiError::internal(format!("a destination record does not parse: {e}"))))
        .collect::<ApiResult<Vec<DestinationView>>>()?;
    Ok(DestinationList { applied_index: r.applied_index, destinations })
}

#[utoipa::path(get, path = "/api/destinations", tag = "destinations",
    responses((status = 200, description = "Destinations: lock holder, queue, current releases, nodes", body = DestinationList), Errors))]
async fn destinations(State(api): State<HttpApi>, Caller(caller): Caller) -> ApiResult<Json<DestinationList>> {
    Ok(Json(destination_views(&api, &caller).await?))
}

async fn node_views(api: &HttpApi, caller: &KnownCaller) -> ApiResult<Vec<NodeView>> {
    let r = api
        .forward
        .call(
            caller,
            ListNodesRequest::default(),
            |c, r| async move { Control::list_nodes(&*c, r).await },
            |mut c, r| async move { c.list_nodes(r).await },
        )
        .await?;
    r.nodes_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| ApiError::internal(format!("a node record does not parse: {e}"))))
        .collect()
}

#[utoipa::path(get, path = "/api/nodes", tag = "cluster",
    responses((status = 200, description = "Worker nodes: labels, connected, last seen", body = Vec<Object>), Errors))]
async fn nodes(State(api): State<HttpApi>, Caller(caller): Caller) -> ApiResult<Json<Vec<NodeView>>> {
    Ok(Json(node_views(&api, &caller).await?))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ServerList {
    pub destination: String,
    pub applied_index: u64,
    /// What the leader's sync task last recorded of each server (as
    /// `fleetctl servers DEST -o json`): health, release and address per
    /// app, drift.
    #[schema(value_type = Vec<Object>)]
    pub servers: Vec<ServerView>,
}

#[utoipa::path(get, path = "/api/destinations/{id}/servers", tag = "destinations",
    params(("id" = String, Path, description = "Destination name", example = "staging")),
    responses((status = 200, description = "The destination's servers: health, releases, drift", body = ServerList), Errors))]
async fn servers(State(api): State<HttpApi>, Caller(caller): Caller, Path(id): Path<String>) -> ApiResult<Json<ServerList>> {
    name_field("destination", &id)?;
    let msg = ListServersRequest { destination: id.clone() };
    let r = api
        .forward
        .call(&caller, msg, |c, r| async move { Control::list_servers(&*c, r).await }, |mut c, r| async move { c.list_servers(r).await })
        .await?;
    let servers = r
        .servers_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| ApiError::internal(format!("a server record does not parse: {e}"))))
        .collect::<ApiResult<Vec<ServerView>>>()?;
    Ok(Json(ServerList { destination: id, applied_index: r.applied_index, servers }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LockJson {
    pub destination: String,
    pub holder: String,
    pub reason: String,
    pub since_ms: i64,
    pub fencing_token: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LockList {
    pub locks: Vec<LockJson>,
    pub applied_index: u64,
}

#[utoipa::path(get, path = "/api/locks", tag = "destinations",
    responses((status = 200, description = "Held locks (linearizable)", body = LockList), Errors))]
async fn locks(State(api): State<HttpApi>, Caller(caller): Caller) -> ApiResult<Json<LockList>> {
    let msg = LockStatusRequest { destination: String::new() };
    let r = api
        .forward
        .call(&caller, msg, |c, r| async move { Control::lock_status(&*c, r).await }, |mut c, r| async move { c.lock_status(r).await })
        .await?;
    let locks = r
        .locks
        .into_iter()
        .map(|l| LockJson {
            destination: l.destination,
            holder: l.holder,
            reason: l.reason,
            since_ms: l.since_ms,
            fencing_token: l.fencing_token,
        })
        .collect();
    Ok(Json(LockList { locks, applied_index: r.applied_index }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberJson {
    pub id: u64,
    pub addr: String,
    pub kind: String,
    pub role: String,
    pub matched_index: u64,
    /// `null` when unknown.
    pub lag: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClusterJson {
    pub cluster_id: String,
    pub leader_id: Option<u64>,
    pub leader_addr: String,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Size in bytes of the answering coordinator's current snapshot.
    pub snapshot_bytes: u64,
    pub purged_index: u64,
    pub answered_by: u64,
    pub members: Vec<MemberJson>,
}

#[utoipa::path(get, path = "/api/cluster", tag = "cluster",
    responses((status = 200, description = "Leader, term, indexes, members and their lag", body = ClusterJson), Errors))]
async fn cluster(State(api): State<HttpApi>, Caller(caller): Caller) -> ApiResult<Json<ClusterJson>> {
    let msg = ClusterStatusRequest { local: false };
    let r = api
        .forward
        .call(
            &caller,
            msg,
            |c, r| async move { Control::cluster_status(&*c, r).await },
            |mut c, r| async move { c.cluster_status(r).await },
        )
        .await?;
    Ok(Json(ClusterJson {
        cluster_id: r.cluster_id,
        leader_id: (r.leader_id != 0).then_some(r.leader_id),
        leader_addr: r.leader_addr,
        term: r.term,
        last_log_index: r.last_log_index,
        commit_index: r.commit_index,
        applied_index: r.applied_index,
        snapshot_index: r.snapshot_index,
        snapshot_bytes: r.snapshot_bytes,
        purged_index: r.purged_index,
        answered_by: r.answered_by,
        members: r
            .members
            .into_iter()
            .map(|m| MemberJson {
                id: m.id,
                addr: m.addr,
                kind: m.kind,
                role: m.role,
                matched_index: m.matched_index,
                lag: (m.lag != u64::MAX).then_some(m.lag),
            })
            .collect(),
    }))
}

/// `GET /api/whoami`: who this request is authenticated as.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The certificate's common name, or `token:NAME`.
    pub name: String,
    /// `viewer` or `operator` (`node`, `coordinator` for such certificates).
    #[schema(value_type = String)]
    pub role: fleet_core::auth::Role,
    /// `certificate` or `token`.
    #[schema(value_type = String)]
    pub via: fleet_core::Via,
    /// Your address as this coordinator sees it.
    pub from: String,
}

#[utoipa::path(get, path = "/api/whoami", tag = "access",
    responses((status = 200, description = "Who this request is authenticated as", body = WhoAmI), Errors))]
async fn whoami(Caller(caller): Caller) -> Json<WhoAmI> {
    Json(WhoAmI { name: caller.name, role: caller.role, via: caller.via, from: caller.from })
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, default)]
pub struct AuditQuery {
    /// 1 to 1000; default 50.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only records older than this log index: the `next_before` of the previous page.
    #[param(minimum = 1)]
    before: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub applied_index: u64,
    /// Newest first.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<fleet_core::state::AuditRecord>,
    /// Pass as `before` for the next (older) page; absent when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
}

#[utoipa::path(get, path = "/api/audit", tag = "access", params(AuditQuery),
    responses((status = 200, description = "Operator actions, newest first", body = AuditList), Errors))]
/// `GET /api/audit?limit=&before=`: operator actions, newest first.
async fn audit(
    State(api): State<HttpApi>,
    Caller(caller): Caller,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<AuditList>> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::field("limit", format!("must be 1 to {MAX_LIST_LIMIT}")));
    }
    if q.before == Some(0) {
        return Err(ApiError::field("before", "must be a log index above 0 (the `next_before` of the previous page)"));
    }
    let msg = ListAuditRequest { limit, before: q.before.unwrap_or(0) };
    let r = api
        .forward
        .call(&caller, msg, |c, r| async move { Control::list_audit(&*c, r).await }, |mut c, r| async move { c.list_audit(r).await })
        .await?;
    let records = r
        .records_json
        .iter()
        .map(|j| serde_json::from_str(j).map_err(|e| ApiError::internal(format!("an audit record does not parse: {e}"))))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(AuditList { applied_index: r.applied_index, records, next_before: (r.next_before != 0).then_some(r.next_before) }))
}

#[utoipa::path(get, path = "/api/events", tag = "deployments",
    params(("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (a Raft log index)")),
    responses((status = 200, description = "Server-sent events: `hello`, `deployment`, `destination`, `destination_removed`, `reset`", content_type = "text/event-stream", body = String), Errors))]
/// `GET /api/events`: SSE, answered from this coordinator's applied state.
async fn events(State(api): State<HttpApi>, Caller(caller): Caller, headers: HeaderMap) -> ApiResult<Response> {
    may_read(&caller, "the event stream")?;
    let last = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::field("Last-Event-ID", "must be an event id this API sent (a Raft log index)"))?,
        ),
    };
    Ok(api.journal.stream(last).into_response())
}

// ------------------------------------------------------ health, metrics

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    #[schema(value_type = String)]
    pub status: &'static str,
    pub id: u64,
    pub leader_id: Option<u64>,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    /// Why not ready (`/readyz` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A coordinator is ready when this many entries or fewer of its own log
/// are not yet applied (and it knows a leader).
pub const READY_LAG: u64 = 64;

fn health(api: &HttpApi) -> Health {
    let m = api.raft.metrics().borrow().clone();
    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
    let last = m.last_log_index.unwrap_or(0);
    let reason = if let Err(e) = &m.running_state {
        Some(format!("Raft stopped: {e}; restart this coordinator"))
    } else if m.current_leader.is_none() {
        Some("no known leader (an election is in progress, or this coordinator is cut off)".to_string())
    } else if last.saturating_sub(applied) > READY_LAG {
        Some(format!("catching up: {applied} of {last} log entries applied"))
    } else {
        None
    };
    Health {
        status: if reason.is_none() { "ready" } else { "not_ready" },
        id: m.id,
        leader_id: m.current_leader,
        term: m.current_term,
        last_log_index: last,
        applied_index: applied,
        reason,
    }
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health), (status = 503, description = "Raft stopped", body = Health),
        (status = 401, description = "No client certificate and no valid bearer token", body = ApiError)))]
/// Alive: the process serves and Raft has not stopped.
async fn healthz(State(api): State<HttpApi>, _: Caller) -> ApiResult<Response> {
    let running = api.raft.metrics().borrow().running_state.is_ok();
    let mut h = health(&api);
    h.reason = None;
    h.status = if running { "ok" } else { "stopped" };
    let code = if running { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((code, Json(h)).into_response())
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready: a leader is known and this coordinator has caught up", body = Health),
        (status = 503, description = "Not ready; `reason` says why", body = Health),
        (status = 401, description = "No client certificate and no valid bearer token", body = ApiError)))]
/// Ready: a leader is known and the state machine has caught up.
async fn readyz(State(api): State<HttpApi>, _: Caller) -> ApiResult<Response> {
    let h = health(&api);
    let code = if h.reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Ok((code, Json(h)).into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", content_type = "application/openmetrics-text", body = String), Errors))]
async fn metrics(State(api): State<HttpApi>, Caller(caller): Caller) -> ApiResult<Response> {
    may_read(&caller, "/metrics")?;
    let text = crate::metrics::render(&api.raft, &api.state, &api.hub);
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the README's HTTP API section lists them")
}

// ------------------------------------------------------------- OpenAPI

/// The API's OpenAPI document, generated from the handlers and types above.
#[derive(OpenApi)]
#[openapi(
    info(title = "Fleet coordinator HTTP API", description = "Deployments, destinations, locks, nodes and the cluster of a Fleet coordinator. \
        Authenticate with a client certificate signed by the cluster CA or `Authorization: Bearer <token>` (`fleetctl tokens create`). \
        Any coordinator answers; writes are forwarded to the leader."),
    paths(submit, list_deployments, get_deployment, cancel, rollback, promote, destinations, servers, locks, nodes, cluster,
        whoami, audit, events, healthz, readyz, metrics, openapi),
    components(schemas(ApiError, Code)),
    modifiers(&Security),
    tags(
        (name = "deployments", description = "Submit, follow, cancel, roll back, promote"),
        (name = "destinations", description = "Destinations, their locks and servers"),
        (name = "cluster", description = "Coordinators and worker nodes"),
        (name = "access", description = "Who you are; what operators did"),
        (name = "health", description = "Liveness, readiness, Prometheus metrics"),
    )
)]
pub struct ApiDoc;

/// Bearer tokens or client certificates, on every operation.
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        components.add_security_scheme(
            "certificate",
            SecurityScheme::MutualTls {
                description: Some("A client certificate from `fleetctl certs issue ROLE NAME`".into()),
                extensions: None,
            },
        );
        doc.security = Some(vec![
            SecurityRequirement::new("token", Vec::<String>::new()),
            SecurityRequirement::new("certificate", Vec::<String>::new()),
        ]);
    }
}

/// `GET /api/openapi.json` (any authenticated caller).
#[utoipa::path(get, path = "/api/openapi.json", tag = "health",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object), Errors))]
async fn openapi(_: Caller) -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router serves under /api, /healthz, /readyz and
    /// /metrics is in the OpenAPI document, and nothing else is.
    #[test]
    fn the_openapi_document_describes_every_route() {
        let source = include_str!("api.rs");
        let mut routes: Vec<String> = source
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\"").and_then(|r| r.split_once('"')).map(|(p, _)| p.to_string()))
            .collect();
        routes.sort();
        let doc = ApiDoc::openapi();
        let mut documented: Vec<String> = doc.paths.paths.keys().cloned().collect();
        documented.sort();
        assert_eq!(documented, routes);
        let json = serde_json::to_value(&doc).expect("the document serializes");
        assert_eq!(json["openapi"], "3.1.0");
        assert!(json["components"]["securitySchemes"]["token"].is_object(), "{}", json["components"]);
        assert!(json["components"]["schemas"]["ApiError"].is_object());
    }
}
