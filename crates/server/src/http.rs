//! Admin HTTP: `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status` (JSON) and `/`, a small
//! status page for people.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::grpc::{Node, StatusView};

#[derive(Clone)]
struct AdminState {
    node: Arc<Node>,
    exporter: PrometheusHandle,
}

/// The admin router.
pub(crate) fn router(node: Arc<Node>, exporter: PrometheusHandle) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(AdminState { node, exporter })
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let status = state.node.engine.status();
    // Request series of every served table exist before its first request (at 0).
    for m in &status.models {
        for t in &m.tables {
            state.node.metrics.table(&m.name, &t.name, || true);
        }
    }
    crate::metrics::record_status(&status);
    if state.node.cluster.is_some() {
        metrics::gauge!("hopps_ready").set(if state.node.is_ready() { 1.0 } else { 0.0 });
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.exporter.render(),
    )
        .into_response()
}

/// The process is up and answering; says nothing about models.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 once every configured model serves a version (in a cluster: once every shard placed on
/// this node is held); 503 with what is still missing.
async fn readyz(State(state): State<AdminState>) -> Response {
    if let Some(agent) = &state.node.cluster {
        return match agent.readiness(&state.node.engine) {
            Ok(()) => (StatusCode::OK, "ready\n").into_response(),
            Err(missing) => {
                let mut body = String::from("not ready\n");
                for m in missing {
                    body.push_str(&m);
                    body.push('\n');
                }
                (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
            }
        };
    }
    if state.node.engine.is_ready() {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let status = state.node.engine.status();
    let mut body = String::from("not ready\n");
    for m in status.models.iter().filter(|m| m.state != "serving") {
        let _ = write!(body, "{}: {}", m.name, m.state);
        if let Some(load) = &m.load {
            let _ = write!(
                body,
                " (version {}: {}/{} rows)",
                load.version, load.rows_done, load.rows_total
            );
        }
        if let Some(err) = &m.last_error {
            let _ = write!(body, ": {err}");
        }
        body.push('\n');
    }
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    let view = state.node.status_view();
    match serde_json::to_string_pretty(&view) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode status as JSON: {err}\n"),
        )
            .into_response(),
    }
}

async fn page(State(state): State<AdminState>) -> Html<String> {
    Html(render_page(&state.node.status_view()))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Human-readable bytes (binary units).
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn render_page(view: &StatusView) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>hopps {node}</title><style>body{{font-family:sans-serif;margin:2em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#eee}}td.l{{text-align:left}}.bad{{color:#b00}}</style></head><body>\
         <h1>hopps node {node}</h1><p>{ready} · hopps {version} · up {uptime:.0} s · repository <code>{repo}</code> · \
         memory {used} of {limit} · WAL {wal}</p>\
         <p><a href=\"/status\">/status</a> (JSON) · <a href=\"/metrics\">/metrics</a> · <a href=\"/readyz\">/readyz</a></p>",
        node = escape(&view.node_id),
        ready = if view.ready {
            "ready"
        } else {
            "<b class=\"bad\">not ready</b>"
        },
        version = view.version,
        uptime = view.uptime_seconds,
        repo = escape(&view.repository),
        used = human_bytes(view.memory_used_bytes),
        limit = view
            .memory_limit_bytes
            .map_or_else(|| "no limit".to_string(), human_bytes),
        wal = human_bytes(view.wal_bytes),
    );
    html.push_str(
        "<h2>Models</h2><table><tr><th>model</th><th>state</th><th>serving</th><th>newest</th>\
         <th>rows</th><th>memory</th><th>undo</th><th>load factor</th><th>load</th><th>failures</th></tr>",
    );
    for m in &view.models {
        let load = m.load.as_ref().map_or_else(String::new, |l| {
            let pct = if l.rows_total == 0 {
                0.0
            } else {
                100.0 * l.rows_done as f64 / l.rows_total as f64
            };
            format!("v{} {pct:.0}% (ETA {:.0} s)", l.version, l.eta_seconds)
        });
        let _ = write!(
            html,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            escape(&m.name),
            escape(&m.state),
            opt(m.serving_version),
            opt(m.newest_version),
            m.rows,
            human_bytes(m.memory_bytes),
            human_bytes(m.undo_bytes),
            m.load_factor,
            escape(&load),
            m.load_failures,
        );
        if let Some(err) = &m.last_error {
            let _ = write!(
                html,
                "<tr><td class=\"l bad\" colspan=\"10\">last error: {}</td></tr>",
                escape(err)
            );
        }
    }
    html.push_str("</table><h2>Tables</h2><table><tr><th>model</th><th>table</th><th>dim</th><th>dtype</th>\
         <th>missing</th><th>rows</th><th>capacity</th><th>load factor</th><th>bytes</th><th>bytes/row</th></tr>");
    for m in &view.models {
        for t in &m.tables {
            let per_row = if t.rows == 0 {
                0.0
            } else {
                t.bytes as f64 / t.rows as f64
            };
            let _ = write!(
                html,
                "<tr><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{:.3}</td><td>{}</td><td>{per_row:.1}</td></tr>",
                escape(&m.name),
                escape(&t.name),
                t.dim,
                escape(&t.dtype),
                escape(&t.missing),
                t.rows,
                t.capacity,
                t.load_factor,
                human_bytes(t.bytes),
            );
        }
    }
    html.push_str("</table></body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_bytes_are_readable() {
        assert_eq!(
            escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
