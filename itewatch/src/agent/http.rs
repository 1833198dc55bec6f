//! The agent's HTTP: a read-only server (`/metrics`, `/healthz`, `/incidents`,
//! `/incidents/{id}`) and a minimal HTTP/1.1 client for Alertmanager (plain `http://` only).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::State;

/// `host`, `port` and path prefix of an `http://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

pub fn parse_http_url(s: &str) -> Result<HttpUrl, String> {
    let uri: hyper::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("only http:// is supported (put a TLS proxy in front)".into());
    }
    let host = uri.host().ok_or("no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path().trim_end_matches('/').to_string();
    Ok(HttpUrl { host, port, path })
}

/// POSTs a JSON body; returns the status code. Bounded by `timeout` as a whole.
pub async fn post_json(
    url: &HttpUrl,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<u16, String> {
    let fut = async {
        let stream = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", url.host, url.port))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{}", url.path, path))
            .header("host", format!("{}:{}", url.host, url.port))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        // Drain the body so the connection closes cleanly.
        let _ = resp.into_body().collect().await;
        driver.abort();
        Ok(status)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

const JSON: &str = "application/json";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus does; curl and promtool do
/// not, and get the classic text format, as from client_golang).
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|m| {
            let mut parts = m.split(';').map(str::trim);
            let refused = parts.clone().any(|p| p == "q=0" || p == "q=0.0");
            parts.next() == Some("application/openmetrics-text") && !refused
        })
    })
}

fn route(
    state: &State,
    method: &Method,
    path: &str,
    accept: Option<&str>,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "read-only\n");
    }
    match path {
        "/metrics" if wants_openmetrics(accept) => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.encode_classic(),
        ),
        "/healthz" => match state.metrics.blind() {
            // Up but blind: a health check must not call this agent healthy.
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{why}\n"),
            ),
            None => reply(StatusCode::OK, "text/plain", "ok\n"),
        },
        "/incidents" => reply(StatusCode::OK, JSON, state.incidents_json()),
        p => match p.strip_prefix("/incidents/") {
            Some(id) => match state.incident_json(id) {
                Some(body) => reply(StatusCode::OK, JSON, body),
                None => reply(
                    StatusCode::NOT_FOUND,
                    JSON,
                    "{\"error\":\"no such incident\"}\n",
                ),
            },
            None => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        },
    }
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("itewatch agent: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let r = route(&state, req.method(), req.uri().path(), accept);
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_http_url("http://127.0.0.1:9093/am/").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9093, "/am")
        );
        assert_eq!(parse_http_url("http://am").unwrap().port, 80);
        assert!(parse_http_url("https://am").is_err());
        assert!(parse_http_url("am:9093").is_err());
    }

    /// Regression (issue: blind but "live"): with a required probe missing the agent is up
    /// but cannot see what it is for; /healthz says so with 503 and the metric counts it.
    #[test]
    fn a_blind_agent_is_not_healthy() {
        let metrics = Arc::new(super::super::metrics::Metrics::new());
        let state = State::new(metrics.clone());
        assert_eq!(
            route(&state, &Method::GET, "/healthz", None).status(),
            StatusCode::OK
        );
        metrics.probe("qi_submit_sync", false, true);
        metrics.probe("pci_dev_set_disconnected", false, false);
        metrics.set_required_missing(vec!["qi_submit_sync".into()]);
        let r = route(&state, &Method::GET, "/healthz", None);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = metrics.encode_classic();
        assert!(
            text.contains("itewatch_required_probes_missing 1"),
            "{text}"
        );
        assert!(
            text.contains("itewatch_probe_attached{probe=\"qi_submit_sync\",required=\"true\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        // What Prometheus 2.42 sends.
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }
}
