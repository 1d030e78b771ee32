//! The gateway, served in this process (its library's `app`, on a manual
//! clock where a test needs one) and as a child process (the binary): its
//! API, its admin routes and admin key check, and graceful shutdown.

#[path = "../support/mod.rs"]
mod support;

mod admin_errors;
mod admin_key;
mod admin_keys;
mod admin_usage;
mod browser;
mod cli;
mod dashboard;
mod hardening;
mod mock;
mod shutdown;
mod upstream;
mod usage;

/// Serves the gateway's app for the config `toml` on `store`, on a free
/// loopback port, until the returned sender drops (or is sent to); the
/// base URL.
async fn serve_config<S: tollgate::store::Store>(
    toml: &str,
    store: S,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let config = tollgate::config::Config::from_toml(toml).unwrap();
    let app = tollgate_gateway::app(&config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tollgate_gateway::serve(listener, app, async {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), tx)
}
