//! Child processes the harness starts: spawned with output in a log file,
//! killed and reaped on drop (also during a panic), and started again on
//! fresh ports when another process took a port between our probe and its
//! bind.
//!
//! Invariant: a [`ManagedProcess`] never outlives its value; there is no
//! detach. (A test binary killed with SIGKILL cannot run drops; its children
//! then linger until the machine reaps them.)

use std::fs::File;
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use anyhow::{Context, Result, anyhow};

/// How many times a start is tried when its ports were taken under it.
pub const START_ATTEMPTS: usize = 5;

/// A running child process whose stdout and stderr go to one log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
}

impl ManagedProcess {
    /// Spawns `program` with `args`, writing its output to `<dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        let log_path = dir.join(format!("{name}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("creating log file {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {}", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log_path,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL (a crash: no cleanup runs) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("sending SIGKILL")?;
        self.child.wait().context("reaping the killed process")?;
        Ok(())
    }

    /// The file holding the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of the log (empty when unreadable).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `Err` describing the exit when the process is no longer running;
    /// [`StartFailure::PortTaken`] when its log shows a lost port race.
    pub fn ensure_running(&mut self) -> Result<(), StartFailure> {
        let status = self
            .child
            .try_wait()
            .with_context(|| format!("checking whether {} is running", self.name))?;
        match status {
            None => Ok(()),
            Some(status) => Err(self.exited(status)),
        }
    }

    fn exited(&self, status: ExitStatus) -> StartFailure {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        if is_bind_conflict(&log) {
            return StartFailure::PortTaken;
        }
        StartFailure::Failed(anyhow!(
            "{} exited early ({status}); log {}:\n{}",
            self.name,
            self.log_path.display(),
            self.log_tail(30)
        ))
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        // SIGKILL then reap: nothing of the test's state must survive it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why one attempt at starting a process did not produce a ready instance.
#[derive(Debug)]
pub enum StartFailure {
    /// A port chosen as free was taken before the process bound it: retry.
    PortTaken,
    /// Anything else: give up.
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for StartFailure {
    fn from(err: anyhow::Error) -> Self {
        Self::Failed(err)
    }
}

/// Whether a log shows that binding a listening port failed.
pub fn is_bind_conflict(log: &str) -> bool {
    // Go's servers write it in lower case, Rust's io::Error capitalised.
    log.to_ascii_lowercase().contains("address already in use")
}

/// Runs `attempt` until it succeeds, fails for a reason other than a port
/// race, or [`START_ATTEMPTS`] port races happened.
pub async fn start_with_retries<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StartFailure>>,
{
    for _ in 0..START_ATTEMPTS {
        match attempt().await {
            Ok(started) => return Ok(started),
            Err(StartFailure::PortTaken) => continue,
            Err(StartFailure::Failed(err)) => return Err(err.context(format!("starting {what}"))),
        }
    }
    Err(anyhow!(
        "starting {what}: ports were taken by other processes {START_ATTEMPTS} times"
    ))
}

/// A loopback TCP port that was free a moment ago. Another process may take
/// it before ours binds it; [`start_with_retries`] covers that race.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_conflict_is_recognised() {
        let etcd = "listen tcp 127.0.0.1:2379: bind: address already in use";
        assert!(is_bind_conflict(etcd));
        assert!(!is_bind_conflict("etcd: member ready"));
    }

    #[test]
    fn free_ports_are_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }

    #[test]
    fn drop_kills_and_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut proc =
            ManagedProcess::spawn("sleeper", Path::new("sleep"), &["600".into()], dir.path())
                .unwrap();
        proc.ensure_running().unwrap();
        let pid = proc.pid();
        drop(proc);
        // Reaped: no /proc entry (not even a zombie) is left for the pid.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn early_exit_carries_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let args = ["-c".to_owned(), "echo boom-marker; exit 3".to_owned()];
        let mut proc = ManagedProcess::spawn("shell", Path::new("sh"), &args, dir.path()).unwrap();
        let err = loop {
            match proc.ensure_running() {
                Ok(()) => std::thread::yield_now(),
                Err(err) => break err,
            }
        };
        let StartFailure::Failed(err) = err else {
            panic!("not a port race")
        };
        let text = format!("{err:#}");
        assert!(
            text.contains("boom-marker") && text.contains("exited early"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn port_races_are_retried() {
        let mut tries = 0;
        let started = start_with_retries("thing", || {
            tries += 1;
            let result = if tries < 3 {
                Err(StartFailure::PortTaken)
            } else {
                Ok(tries)
            };
            async move { result }
        })
        .await
        .unwrap();
        assert_eq!(started, 3);
        let err =
            start_with_retries::<(), _, _>("thing", || async { Err(StartFailure::PortTaken) })
                .await
                .unwrap_err();
        assert!(err.to_string().contains("taken"), "{err}");
    }
}
