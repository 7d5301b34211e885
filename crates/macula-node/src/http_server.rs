//! The HTTP listener (WebSocket upgrades, the HTTP bridge, the registry's REST API, metrics):
//! its own accept loop, so that what one client holds is bounded.
//!
//! - **Connection cap** (`limits.max_http_connections`): a connection over the cap is closed as
//!   soon as it is accepted (and counted), so a flood of idle sockets cannot exhaust the node's
//!   file descriptors or memory; those already served keep working. The cap counts HTTP
//!   connections; a connection upgraded to a WebSocket leaves it (sessions are capped by
//!   `limits.max_sessions`).
//! - **Header-read timeout** (`limits.http_header_timeout_ms`): a client that does not send a
//!   request's complete headers in time, from its first byte or from none, is disconnected (a
//!   "slowloris" holds nothing for long). HTTP/1.1 only, served by hyper's own HTTP/1 connection.
//!   With TLS on, the first byte tells TLS from plain HTTP (see [`crate::tls`]); that wait and the
//!   TLS handshake are bounded by the same timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::node::Node;
use crate::tls::{Stream, Tls};

/// Serves `app` on `listener` until the task is dropped; with `tls`, TLS and (where its policy
/// allows) plain HTTP on the one port.
pub async fn serve(listener: TcpListener, app: Router, node: Arc<Node>, tls: Option<Arc<Tls>>) {
    let limits = &node.config.limits;
    let permits = Arc::new(Semaphore::new(limits.max_http_connections.max(1)));
    let header_timeout = Duration::from_millis(limits.http_header_timeout_ms.max(1));
    let refusal: Arc<[u8]> = crate::tls::http_refusal().into();
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, typically: back off instead of spinning.
                tracing::warn!("HTTP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            node.metrics
                .http_refused_connections
                .fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let refusal = refusal.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(tls) = tls else {
                return serve_connection(stream, addr, app, header_timeout).await;
            };
            // The TLS handshake shares the header deadline: a silent client is cut off either way.
            match tls.accept(stream, addr, header_timeout, &refusal).await {
                Some(Stream::Plain(s)) => serve_connection(s, addr, app, header_timeout).await,
                Some(Stream::Tls(s)) => serve_connection(*s, addr, app, header_timeout).await,
                None => {}
            }
        });
    }
}

async fn serve_connection<S>(stream: S, addr: SocketAddr, app: Router, header_timeout: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.oneshot(req).await.unwrap_or_else(|e| match e {})) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%addr, "HTTP connection ended: {e}");
    }
}
