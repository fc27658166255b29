//! The local process driver: each instance is a child process on a port of its own.
//!
//! No instance may outlive surge, even when surge is killed with SIGKILL and has no chance to
//! clean up. Each child therefore asks the kernel for `PR_SET_PDEATHSIG(SIGKILL)`, which fires
//! when the thread that forked it exits. Launches happen on tokio worker threads, which live as
//! long as the runtime (surge never calls `block_in_place`, which could retire one early).
//! Each child also leads a process group of its own, so stopping it reaches the processes it
//! started (a shell wrapper's children), and a Ctrl-C in surge's terminal reaches surge alone,
//! which then drains and stops the instances in order.
#![allow(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::driver::{Driver, Exit, InstanceControl, LaunchError, LaunchSpec, Launched, OutputTail};

#[derive(Debug, Default)]
pub struct ProcessDriver;

/// The resource limits to set in the child, as setrlimit takes them: a fixed array, so the
/// child allocates nothing between fork and exec.
fn rlimits(limits: &surge_config::ProcessLimits) -> [Option<(libc::__rlimit_resource_t, libc::rlim_t)>; 4] {
    [
        limits.memory.map(|bytes| (libc::RLIMIT_AS, bytes)),
        limits.open_files.map(|files| (libc::RLIMIT_NOFILE, files)),
        limits.processes.map(|processes| (libc::RLIMIT_NPROC, processes)),
        limits.cpu_seconds.map(|seconds| (libc::RLIMIT_CPU, seconds)),
    ]
}

impl Driver for ProcessDriver {
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError> {
        let port = free_port().map_err(LaunchError::Port)?;
        let mut command = Command::new(&spec.command);
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", port.to_string())
            .env("SURGE_INSTANCE", &spec.instance_id)
            .env("SURGE_SERVICE", &spec.service)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let limits = rlimits(&spec.limits);
        let switch_to = spec.run_as.as_ref().map(|run_as| (run_as.uid, run_as.gid));
        let parent = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (setrlimit, setgroups, setgid, setuid, prctl,
        // getppid) on values prepared before the fork; it touches no locks and allocates
        // nothing. The order matters: limits while still privileged (a hard limit above the
        // inherited one needs it), then the user, then the death signal, which a change of
        // credentials would clear.
        unsafe {
            command.pre_exec(move || {
                for (resource, value) in limits.iter().flatten() {
                    let limit = libc::rlimit { rlim_cur: *value, rlim_max: *value };
                    if libc::setrlimit(*resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some((uid, gid)) = switch_to {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // If surge died between fork and prctl, no signal will ever come: leave now
                // (an errno, since building any other error would allocate).
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|source| LaunchError::Spawn { command: spec.command.display().to_string(), source })?;
        let pid = child.id();

        let output = OutputTail::default();
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(fold_into_log(stdout, spec.instance_id.clone(), output.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(fold_into_log(stderr, spec.instance_id.clone(), output.clone()));
        }

        let exited_flag = Arc::new(AtomicBool::new(false));
        let control = ProcessControl { pid, exited: Arc::clone(&exited_flag) };
        let exited = async move {
            let exit = match child.wait().await {
                Ok(status) => describe(status),
                Err(err) => Exit { success: false, description: format!("could not be waited for: {err}") },
            };
            exited_flag.store(true, Ordering::SeqCst);
            exit
        };
        Ok(Launched {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            pid,
            control: Box::new(control),
            exited: Box::pin(exited),
            output: Some(output),
        })
    }
}

/// The unit of the CPU times in /proc (USER_HZ, 100 on Linux unless configured otherwise).
pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// A port the kernel just handed out. Another process could take it before the instance
/// binds it; the instance then fails its start and is replaced.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// Copies an instance's output into surge's log, one event per line, and keeps its last lines.
async fn fold_into_log(reader: impl AsyncRead + Unpin, instance: String, tail: OutputTail) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                tracing::info!(target: "instance", "[{instance}] {text}");
                tail.push(text);
            }
        }
    }
}

fn describe(status: std::process::ExitStatus) -> Exit {
    let description = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}{}", signal_name(signal)),
        (None, None) => status.to_string(),
    };
    Exit { success: status.success(), description }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        _ => "",
    }
}

struct ProcessControl {
    pid: Option<u32>,
    exited: Arc<AtomicBool>,
}

impl ProcessControl {
    fn signal_group(&self, signal: i32) {
        // Once reaped, the pid may belong to someone else: never signal it then.
        if self.exited.load(Ordering::SeqCst) {
            return;
        }
        if let Some(pid) = self.pid.and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions. A negative pid addresses
            // the process group the child leads (it was started with process_group(0)).
            unsafe {
                libc::kill(-pid, signal);
            }
        }
    }
}

impl InstanceControl for ProcessControl {
    fn terminate(&self) {
        self.signal_group(libc::SIGTERM);
    }

    fn kill(&self) {
        self.signal_group(libc::SIGKILL);
    }
}
