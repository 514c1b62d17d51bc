//! The control socket: `<data_dir>/control.sock`, a Unix socket (mode 0600) through which
//! `edgegw reload` asks the running gateway to reload its config and hears the outcome:
//! `ok <what was reloaded>` or `error <why nothing changed>` (the config's problems with
//! their lines). SIGHUP does the same reload but can only report in the log.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

/// The socket's file name in the data directory.
pub const FILE: &str = "control.sock";
/// How long a client may take to send its command.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest command line read.
const MAX_COMMAND: u64 = 256;

/// Where the gateway answers: the reload's summary, or why nothing changed.
pub type Reply = oneshot::Sender<Result<String, String>>;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// Listens on the data directory's control socket until `shutdown`; each `reload` request
/// goes to `requests` with a slot for its answer. A socket file left by a gateway that did
/// not stop cleanly is replaced; one a running gateway answers on is an error.
pub fn start(
    data_dir: &Path,
    requests: mpsc::Sender<Reply>,
    shutdown: CancellationToken,
) -> anyhow::Result<PathBuf> {
    let path = socket_path(data_dir);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            anyhow::bail!(
                "another gateway answers on {} (same gateway.data_dir); stop it first",
                path.display()
            );
        }
        std::fs::remove_file(&path).with_context(|| {
            format!("cannot remove the stale control socket {}", path.display())
        })?;
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict the control socket {}", path.display()))?;
    let served = path.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(answer(stream, requests.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "Control socket: accept failed.");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&served);
    });
    Ok(path)
}

/// One client: one command, one answer.
async fn answer(stream: UnixStream, requests: mpsc::Sender<Reply>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_COMMAND));
    let outcome = match tokio::time::timeout(READ_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => match line.trim() {
            "reload" => {
                let (reply, outcome) = oneshot::channel();
                match requests.send(reply).await {
                    Ok(()) => outcome
                        .await
                        .unwrap_or_else(|_| Err("the gateway is stopping".into())),
                    Err(_) => Err("the gateway is stopping".into()),
                }
            }
            other => Err(format!(
                "unknown command `{other}`; the control socket takes `reload`"
            )),
        },
        Ok(Err(error)) => Err(format!("cannot read the command: {error}")),
        Err(_) => Err("no command within 5 s".into()),
    };
    let text = match outcome {
        Ok(summary) => format!("ok {summary}\n"),
        Err(error) => format!("error {error}\n"),
    };
    let _ = write.write_all(text.as_bytes()).await;
}

/// `edgegw reload`: asks the gateway on `socket` to reload and returns its answer.
pub fn request_reload(socket: &Path, timeout: Duration) -> anyhow::Result<Result<String, String>> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "no gateway answers on {} (is it running, with this gateway.data_dir?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"reload\n")?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .context("no answer from the gateway")?;
    let answer = answer.trim_end();
    if let Some(summary) = answer.strip_prefix("ok ") {
        Ok(Ok(summary.to_string()))
    } else if let Some(error) = answer.strip_prefix("error ") {
        Ok(Err(error.to_string()))
    } else {
        anyhow::bail!("unexpected answer from the gateway: {answer:?}")
    }
}
