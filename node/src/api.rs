//! REST API (JSON, bearer-token authenticated): conversations, history paged by `seq`, agents and
//! presence, canned replies. Errors use the protocol's error codes: `{"code": "...", "message": "..."}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::context::NodeContext;
use crate::engine::Command;
use crate::model::{Agent, CannedReply, ConvState, Conversation, new_id};
use crate::protocol::ErrorCode;
use crate::store::{Op, encode};
use crate::token::now_secs;

/// An API error: a stable code and a human message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub ErrorCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.1.as_str(), "message": self.2 });
        (self.0, Json(body)).into_response()
    }
}

fn err(status: StatusCode, code: ErrorCode, msg: &str) -> ApiError {
    ApiError(status, code, msg.to_owned())
}

fn internal<E: std::fmt::Display>(e: E) -> ApiError {
    tracing::error!(error = %e, "api request failed");
    err(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "internal error")
}

type ApiResult<T> = Result<T, ApiError>;

/// The authenticated caller.
#[derive(Debug)]
enum Caller {
    Agent(Agent),
    Visitor(String),
}

fn caller(ctx: &NodeContext, headers: &HeaderMap) -> ApiResult<Caller> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| err(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, "missing bearer token"))?;
    let denied = |code: ErrorCode| {
        let msg = if code == ErrorCode::TokenExpired { "token expired" } else { "invalid token" };
        err(StatusCode::UNAUTHORIZED, code, msg)
    };
    let claims = crate::token::Signer::verify(ctx.auth.signer(), token, now_secs())
        .map_err(|e| denied(crate::auth::token_code(e)))?;
    match claims.role.as_str() {
        "agent" => {
            let agent =
                ctx.store.agent(&claims.sub).map_err(internal)?.ok_or_else(|| denied(ErrorCode::Unauthorized))?;
            if claims.ep < agent.token_epoch {
                return Err(denied(ErrorCode::Unauthorized));
            }
            Ok(Caller::Agent(agent))
        }
        "visitor" => Ok(Caller::Visitor(claims.sub)),
        _ => Err(denied(ErrorCode::Unauthorized)),
    }
}

fn agent_caller(ctx: &NodeContext, headers: &HeaderMap) -> ApiResult<Agent> {
    match caller(ctx, headers)? {
        Caller::Agent(a) => Ok(a),
        Caller::Visitor(_) => Err(err(StatusCode::FORBIDDEN, ErrorCode::Forbidden, "agents only")),
    }
}

fn admin_caller(ctx: &NodeContext, headers: &HeaderMap) -> ApiResult<Agent> {
    let a = agent_caller(ctx, headers)?;
    if !a.admin {
        return Err(err(StatusCode::FORBIDDEN, ErrorCode::Forbidden, "admin token required"));
    }
    Ok(a)
}

/// Routes under `/api`.
pub fn router() -> axum::Router<Arc<NodeContext>> {
    axum::Router::new()
        .route("/api/conversations", get(list_conversations))
        .route("/api/conversations/{id}", get(get_conversation))
        .route("/api/conversations/{id}/entries", get(list_entries))
        .route("/api/agents", get(list_agents).post(create_agent))
        .route("/api/canned", get(list_canned).post(create_canned))
        .route("/api/canned/{id}", axum::routing::put(update_canned).delete(delete_canned))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvQuery {
    state: Option<String>,
    agent: Option<String>,
    limit: Option<usize>,
}

async fn list_conversations(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    Query(q): Query<ConvQuery>,
) -> ApiResult<Response> {
    agent_caller(&ctx, &headers)?;
    let state = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(ConvState::parse(s).ok_or_else(|| {
            err(StatusCode::BAD_REQUEST, ErrorCode::Invalid, "state must be bot, queued, assigned or closed")
        })?),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let store = ctx.store.clone();
    let agent = q.agent.clone();
    let convs = tokio::task::spawn_blocking(move || store.conversations(state, agent.as_deref(), limit))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(Json(serde_json::json!({ "conversations": convs })).into_response())
}

/// The conversation `id` as `who` may see it: agents see every conversation, a visitor only their own. A
/// visitor asking for someone else's gets the same 404 as for a missing one, so ids cannot be probed.
fn visible_conversation(ctx: &NodeContext, who: &Caller, id: &str) -> ApiResult<Conversation> {
    let not_found = || err(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such conversation");
    let conv = ctx.store.conversation(id).map_err(internal)?.ok_or_else(not_found)?;
    match who {
        Caller::Visitor(v) if &conv.visitor != v => Err(not_found()),
        _ => Ok(conv),
    }
}

async fn get_conversation(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let conv = visible_conversation(&ctx, &caller(&ctx, &headers)?, &id)?;
    let last_seq = ctx.store.last_seq(&id).map_err(internal)?;
    let mut value = serde_json::to_value(&conv).map_err(internal)?;
    value["last_seq"] = last_seq.into();
    Ok(Json(value).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntriesQuery {
    after: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn list_entries(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<EntriesQuery>,
) -> ApiResult<Response> {
    visible_conversation(&ctx, &caller(&ctx, &headers)?, &id)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let entries = match (q.after, q.before) {
        (Some(_), Some(_)) => {
            return Err(err(StatusCode::BAD_REQUEST, ErrorCode::Invalid, "give at most one of after and before"));
        }
        (None, Some(b)) => ctx.store.entries_before(&id, b, limit),
        (a, None) => ctx.store.entries_after(&id, a.unwrap_or(0), limit),
    }
    .map_err(internal)?;
    let last_seq = ctx.store.last_seq(&id).map_err(internal)?;
    Ok(Json(serde_json::json!({ "conv": id, "entries": entries, "last_seq": last_seq })).into_response())
}

async fn list_agents(State(ctx): State<Arc<NodeContext>>, headers: HeaderMap) -> ApiResult<Response> {
    agent_caller(&ctx, &headers)?;
    let agents = ctx
        .engine
        .ask(|reply| Command::Agents { reply })
        .await
        .map_err(|_| err(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "node unavailable"))?;
    Ok(Json(serde_json::json!({ "agents": agents })).into_response())
}

/// Body of `POST /api/agents`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub skills: Vec<String>,
    pub capacity: u32,
    #[serde(default)]
    pub admin: bool,
}

impl NewAgent {
    /// Validate into an [`Agent`], naming the bad field.
    pub fn validate(self) -> Result<Agent, String> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self.id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err("id: 1..=64 characters of [A-Za-z0-9._-]".into());
        }
        let name = self.name.trim();
        if name.is_empty() || name.chars().count() > 64 {
            return Err("name: 1..=64 characters".into());
        }
        if self.skills.len() > 32 || self.skills.iter().any(|s| s.is_empty() || s.len() > 32 || s.contains(',')) {
            return Err("skills: at most 32 tags of 1..=32 characters".into());
        }
        if self.capacity == 0 || self.capacity > 1000 {
            return Err("capacity: 1..=1000".into());
        }
        Ok(Agent {
            id: self.id,
            name: name.to_owned(),
            skills: self.skills,
            capacity: self.capacity,
            admin: self.admin,
            token_epoch: 0,
        })
    }
}

async fn create_agent(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    body: Result<Json<NewAgent>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    admin_caller(&ctx, &headers)?;
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, ErrorCode::Invalid, e.body_text()))?;
    let mut agent = body.validate().map_err(|m| ApiError(StatusCode::BAD_REQUEST, ErrorCode::Invalid, m))?;
    if let Some(existing) = ctx.store.agent(&agent.id).map_err(internal)? {
        agent.token_epoch = existing.token_epoch;
    }
    let token = ctx.auth.agent_token(&agent);
    ctx.engine
        .ask(|reply| Command::PutAgent { agent: agent.clone(), reply })
        .await
        .and_then(|r| r)
        .map_err(|_| err(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, "node unavailable"))?;
    tracing::info!(agent = %agent.id, "agent registered over REST");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "agent": agent, "token": token }))).into_response())
}

async fn list_canned(State(ctx): State<Arc<NodeContext>>, headers: HeaderMap) -> ApiResult<Response> {
    agent_caller(&ctx, &headers)?;
    let mut items = ctx.store.canned().map_err(internal)?;
    items.sort_by(|a, b| a.shortcut.cmp(&b.shortcut));
    Ok(Json(serde_json::json!({ "canned": items })).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CannedBody {
    shortcut: String,
    text: String,
}

fn check_canned(b: &CannedBody) -> ApiResult<()> {
    if b.shortcut.trim().is_empty() || b.shortcut.chars().count() > 32 {
        return Err(err(StatusCode::BAD_REQUEST, ErrorCode::Invalid, "shortcut: 1..=32 characters"));
    }
    if b.text.trim().is_empty() || b.text.chars().count() > 4000 {
        return Err(err(StatusCode::BAD_REQUEST, ErrorCode::Invalid, "text: 1..=4000 characters"));
    }
    Ok(())
}

async fn create_canned(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    body: Result<Json<CannedBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    admin_caller(&ctx, &headers)?;
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, ErrorCode::Invalid, e.body_text()))?;
    check_canned(&body)?;
    let item = CannedReply { id: new_id("r"), shortcut: body.shortcut.trim().to_owned(), text: body.text };
    ctx.writer.write(vec![Op::Canned { id: item.id.clone(), json: encode(&item) }]).await.map_err(internal)?;
    Ok((StatusCode::CREATED, Json(item)).into_response())
}

async fn update_canned(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<CannedBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Response> {
    admin_caller(&ctx, &headers)?;
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, ErrorCode::Invalid, e.body_text()))?;
    check_canned(&body)?;
    if !ctx.store.canned().map_err(internal)?.iter().any(|c| c.id == id) {
        return Err(err(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such canned reply"));
    }
    let item = CannedReply { id: id.clone(), shortcut: body.shortcut.trim().to_owned(), text: body.text };
    ctx.writer.write(vec![Op::Canned { id, json: encode(&item) }]).await.map_err(internal)?;
    Ok(Json(item).into_response())
}

async fn delete_canned(
    State(ctx): State<Arc<NodeContext>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    admin_caller(&ctx, &headers)?;
    if !ctx.store.canned().map_err(internal)?.iter().any(|c| c.id == id) {
        return Err(err(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such canned reply"));
    }
    ctx.writer.write(vec![Op::DeleteCanned { id }]).await.map_err(internal)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
