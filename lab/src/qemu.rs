//! Starting QEMU and reading the guest's console.

use std::io::{BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{GuestConfig, LabError};

/// The QEMU system emulator binary.
pub(crate) const QEMU: &str = "qemu-system-x86_64";

#[derive(Default)]
struct Console {
    text: String,
    closed: bool,
}

type Shared = Arc<(Mutex<Console>, Condvar)>;

/// A guest that is running; dropping it kills QEMU (so does the death of the thread that spawned it).
pub struct RunningGuest {
    name: String,
    child: Option<Child>,
    console: Shared,
    started: Instant,
    deadline: Instant,
    log: PathBuf,
    run_dir: PathBuf,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What a guest run produced.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    /// Everything the guest printed on its console (and QEMU on stderr, as `qemu: ...` lines), `\r` removed.
    pub console: String,
    /// The script's exit code on the last boot (`None`: it never finished).
    pub exit_code: Option<i32>,
    /// How many times the guest booted.
    pub boots: usize,
    /// Whether the time limit killed QEMU.
    pub timed_out: bool,
    /// Wall time.
    pub duration: Duration,
    /// Where the console log was written.
    pub log: PathBuf,
}

impl GuestOutput {
    /// Whether the script exited 0 on its last boot and printed no `LAB-FAIL`.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.console.contains("LAB-FAIL")
    }

    /// Panics with the console output unless [`success`](Self::success).
    pub fn assert_success(&self) {
        assert!(
            self.success(),
            "guest script failed (exit {:?}, timed out: {}, log {}):\n{}",
            self.exit_code,
            self.timed_out,
            self.log.display(),
            self.console
        );
    }

    /// Console lines starting with `prefix`, with the prefix removed.
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter_map(move |l| l.trim_start().strip_prefix(prefix).map(str::trim))
    }

    /// The value printed by the guest as `KEY=value` (last occurrence).
    pub fn value(&self, key: &str) -> Option<String> {
        let p = format!("{key}=");
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix(p.as_str()))
            .next_back()
            .map(|s| s.trim().to_string())
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn overlay(cfg: &GuestConfig, base: &Path, out: &Path) -> Result<(), LabError> {
    let err = |e: std::io::Error| LabError::Build(format!("{}: {e}", out.display()));
    let f = std::fs::File::create(out).map_err(err)?;
    let mut w = BufWriter::new(f);
    let mut b = std::fs::File::open(base).map_err(err)?;
    std::io::copy(&mut b, &mut w).map_err(err)?;
    let mut c = crate::cpio::Writer::new(w);
    c.dir("lab", 0o755).map_err(err)?;
    c.file("lab/run.sh", 0o755, cfg.script.as_bytes())
        .map_err(err)?;
    let mut env = String::new();
    for (k, v) in &cfg.env {
        env.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    c.file("lab/env", 0o644, env.as_bytes()).map_err(err)?;
    let mut dirs = std::collections::BTreeSet::new();
    for (src, dst) in &cfg.files {
        let dst = dst.trim_start_matches('/');
        let mut p = Path::new(dst).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
        let _ = src;
    }
    for d in &dirs {
        c.dir(d, 0o755).map_err(err)?;
    }
    for (src, dst) in &cfg.files {
        let data =
            std::fs::read(src).map_err(|e| LabError::Build(format!("{}: {e}", src.display())))?;
        c.file(dst, 0o755, &data).map_err(err)?;
    }
    c.finish().map_err(err)?;
    Ok(())
}

fn reader(
    mut src: impl Read + Send + 'static,
    console: Shared,
    prefix: &'static str,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        let mut pending = String::new();
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let s = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            let (m, cv) = &*console;
            let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
            if prefix.is_empty() {
                c.text.push_str(&s);
            } else {
                pending.push_str(&s);
                while let Some(i) = pending.find('\n') {
                    let line: String = pending.drain(..=i).collect();
                    c.text.push_str(prefix);
                    c.text.push_str(&line);
                }
            }
            cv.notify_all();
        }
        let (m, cv) = &*console;
        let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.is_empty() {
            c.text.push_str(prefix);
            c.text.push_str(&pending);
            c.text.push('\n');
        }
        if prefix.is_empty() {
            c.closed = true;
        }
        cv.notify_all();
    })
}

pub(crate) fn spawn(
    root: &Path,
    kernel: &Path,
    base: &Path,
    cfg: &GuestConfig,
) -> Result<RunningGuest, LabError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let run_dir = root.join(format!("run-{}-{}-{stamp}", cfg.name, std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| LabError::Build(e.to_string()))?;
    let initrd = run_dir.join("initrd.cpio");
    overlay(cfg, base, &initrd)?;
    let log = root.join("logs").join(format!("{}.log", cfg.name));

    let mem = format!("{}M", cfg.mem_mb);
    // Interrupt remapping (intremap) wants the IOAPIC in QEMU, not in KVM: `kernel-irqchip=split` (TCG has
    // neither, and takes the option either way).
    let machine = if cfg.iommu {
        "q35,kernel-irqchip=split"
    } else {
        "q35"
    };
    let mut append = String::from("console=ttyS0 quiet loglevel=1 panic=-1");
    if cfg.iommu {
        append.push_str(" intel_iommu=on iommu=pt");
    }
    let mut args: Vec<String> = vec![
        "-machine".into(),
        machine.into(),
        "-accel".into(),
        "tcg,thread=multi".into(),
        "-cpu".into(),
        "max".into(),
        "-smp".into(),
        cfg.smp.to_string(),
        "-m".into(),
        mem.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        format!("{append} {}", cfg.append),
    ];
    if cfg.iommu {
        // Before every PCI device: QEMU puts behind the IOMMU only the devices created after it. caching-mode
        // makes the guest report new mappings too, which an assigned host device (QEMU's own vfio) needs.
        args.extend([
            "-device".into(),
            "intel-iommu,intremap=on,caching-mode=on".into(),
        ]);
    }
    if cfg.shared_memory {
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id=mem0,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem0".into(),
        ]);
    }
    if !cfg.allow_reboot {
        args.push("-no-reboot".into());
    }
    if cfg.net {
        let mut netdev = "user,id=n0".to_string();
        for (host, guest) in &cfg.host_forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        args.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ]);
    }
    args.extend(cfg.qemu_args.iter().cloned());

    let mut cmd = Command::new(QEMU);
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it makes the kernel kill QEMU when
    // the thread that started it dies, so a test killed before its drop ran leaves no guest behind.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| LabError::Qemu(format!("cannot start {QEMU}: {e}")))?;
    let console: Shared = Arc::new((Mutex::new(Console::default()), Condvar::new()));
    {
        let mut c = console.0.lock().unwrap_or_else(|e| e.into_inner());
        c.text
            .push_str(&format!("qemu: {QEMU} {}\n", args.join(" ")));
    }
    let mut readers = vec![];
    if let Some(o) = child.stdout.take() {
        readers.push(reader(o, console.clone(), ""));
    }
    if let Some(e) = child.stderr.take() {
        readers.push(reader(e, console.clone(), "qemu: "));
    }
    let now = Instant::now();
    Ok(RunningGuest {
        name: cfg.name.clone(),
        child: Some(child),
        console,
        started: now,
        deadline: now + cfg.timeout,
        log,
        run_dir,
        readers,
    })
}

impl RunningGuest {
    /// The console output so far.
    pub fn console(&self) -> String {
        self.console
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    /// QEMU's process id (None once it was collected).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the guest script ended (`LAB-EXIT`) or QEMU closed its console.
    pub fn finished(&self) -> bool {
        let c = self.console.0.lock().unwrap_or_else(|e| e.into_inner());
        c.closed || c.text.lines().any(|l| l.trim().starts_with("LAB-EXIT "))
    }

    /// Freezes the whole guest (SIGSTOP to QEMU): its vCPUs, clock and user-mode network stop while the host's
    /// sockets of its connections stay open, so a peer on the host sees a host that went silent (no FIN, no RST).
    /// The run's time limit keeps counting; [`resume`](Self::resume) lets it go on, dropping kills it anyway.
    pub fn pause(&self) -> Result<(), LabError> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a [`pause`](Self::pause)d guest run again (SIGCONT).
    pub fn resume(&self) -> Result<(), LabError> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, sig: libc::c_int) -> Result<(), LabError> {
        let pid = self
            .pid()
            .ok_or_else(|| LabError::Qemu(format!("{}: QEMU is gone", self.name)))?;
        // SAFETY: signals our own child, which is not reaped yet (`child` is still held), so the pid is its.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return Err(LabError::Qemu(format!(
                "{}: kill({pid}, {sig}): {}",
                self.name,
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Waits until the console shows `needle` at least `count` times.
    pub fn wait_for_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let deadline = (Instant::now() + timeout).min(self.deadline);
        let (m, cv) = &*self.console;
        let mut c = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if c.text.matches(needle).count() >= count {
                return Ok(());
            }
            let now = Instant::now();
            if c.closed || now >= deadline {
                return Err(LabError::Timeout(format!(
                    "{}: waiting for {count}x {needle:?}{}; console:\n{}",
                    self.name,
                    if c.closed { " (QEMU exited)" } else { "" },
                    c.text
                )));
            }
            c = cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until the console shows `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(), LabError> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits for QEMU to exit (killing it at the config's time limit) and collects the output.
    pub fn wait(mut self) -> Result<GuestOutput, LabError> {
        let mut timed_out = false;
        if let Some(c) = self.child.as_mut() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() >= self.deadline => {
                        timed_out = true;
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    Err(e) => return Err(LabError::Qemu(e.to_string())),
                }
            }
        }
        Ok(self.finish(timed_out))
    }

    /// Kills QEMU now (a crash from the back end's point of view) and collects the output.
    pub fn kill(mut self) -> GuestOutput {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.finish(false)
    }

    fn finish(&mut self, timed_out: bool) -> GuestOutput {
        self.child = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let console = self.console();
        let exit_code = console
            .lines()
            .filter_map(|l| l.trim().strip_prefix("LAB-EXIT "))
            .next_back()
            .and_then(|s| s.trim().parse().ok());
        let boots = console
            .lines()
            .filter(|l| l.trim_start().starts_with("LAB-BOOT "))
            .count();
        let mut text = console;
        if timed_out {
            text.push_str(&format!(
                "lab: killed after {:?} (time limit)\n",
                self.deadline - self.started
            ));
        }
        if let Ok(f) = std::fs::File::create(&self.log) {
            let mut f = BufWriter::new(f);
            let _ = f.write_all(text.as_bytes());
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        GuestOutput {
            console: text,
            exit_code,
            boots,
            timed_out,
            duration: self.started.elapsed(),
            log: self.log.clone(),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}
