//! The `file` discovery source: a YAML list of `HOST:PORT` (the syntax of `static`), read at
//! start and re-read when its content changes, without a restart.
//!
//! The file is polled once a second and compared by content, which sees every way a file is
//! replaced (an editor's rename, a Kubernetes ConfigMap's symlink swap) with no watch to lose.
//! A file that cannot be read or parsed keeps the last good set, and the source reports why
//! (FILE:LINE:COL for a bad entry) until a good version appears.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::watch;

use crate::fixed::resolve;
use crate::{Snapshot, Status};

const POLL_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn start(upstream: &str, path: PathBuf, tx: watch::Sender<Snapshot>) {
    let upstream: Arc<str> = upstream.into();
    tokio::spawn(async move {
        let mut last: Option<Vec<u8>> = None;
        let mut last_problem = String::new();
        loop {
            let read = tokio::fs::read(&path).await;
            let unchanged = matches!((&read, &last), (Ok(now), Some(before)) if now == before);
            if !unchanged {
                match load(&path, read).await {
                    Ok((content, endpoints)) => {
                        tracing::info!(%upstream, file = %path.display(), endpoints = endpoints.len(), "endpoint file loaded");
                        tx.send_replace(Snapshot::ready(endpoints));
                        last = Some(content);
                        last_problem.clear();
                    }
                    Err(problem) => {
                        if problem != last_problem {
                            tracing::warn!(%upstream, %problem, "endpoint file rejected; keeping the last good set");
                            last_problem.clone_from(&problem);
                        }
                        tx.send_modify(|s| s.status = Status::Failing(problem));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_EVERY) => {}
                _ = tx.closed() => return,
            }
        }
    });
}

/// The file's content and its endpoints, or why it cannot be used.
async fn load(
    path: &std::path::Path,
    read: std::io::Result<Vec<u8>>,
) -> Result<(Vec<u8>, Vec<crate::Endpoint>), String> {
    let file = path.display().to_string();
    let content = read.map_err(|e| format!("cannot read {file}: {e}"))?;
    let text = std::str::from_utf8(&content).map_err(|_| format!("{file}: not UTF-8 text"))?;
    let listed = config::load_endpoints_str(&file, text)
        .map_err(|e| e.to_string().lines().collect::<Vec<_>>().join("; "))?;
    let endpoints = resolve(&listed).await?;
    Ok((content, endpoints))
}
