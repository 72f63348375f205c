//! `spdk_tgt`'s command line, parsed like SPDK's getopt_long: `-m 0x3`, `-m0x3`, `--cpumask 0x3`,
//! `--cpumask=0x3`. DPDK/trace-only flags are accepted and ignored so existing command lines keep working.

use std::path::PathBuf;

use reactor::CpuMask;

/// Parsed options.
#[derive(Clone, Debug)]
pub struct Opts {
    /// `-c`/`--config`/`--json`.
    pub config: Option<PathBuf>,
    /// `--json-ignore-init-errors`.
    pub json_ignore_init_errors: bool,
    /// `-m`/`--cpumask`.
    pub cpumask: CpuMask,
    /// `-p`/`--main-core`.
    pub main_core: Option<u32>,
    /// `-r`/`--rpc-socket`.
    pub rpc_socket: PathBuf,
    /// `--no-rpc-server`.
    pub no_rpc_server: bool,
    /// `--rpcs-allowed`.
    pub rpcs_allowed: Option<Vec<String>>,
    /// `--wait-for-rpc`.
    pub wait_for_rpc: bool,
    /// `-s`/`--mem-size` in MiB.
    pub mem_size_mb: Option<u64>,
    /// `--no-huge`.
    pub no_huge: bool,
    /// `--huge-dir`.
    pub huge_dir: Option<PathBuf>,
    /// `-u`/`--no-pci`.
    pub no_pci: bool,
    /// `-A`/`--pci-allowed`.
    pub pci_allowed: Vec<String>,
    /// `-B`/`--pci-blocked`.
    pub pci_blocked: Vec<String>,
    /// `-L`/`--logflag`.
    pub log_flags: Vec<String>,
    /// `--silence-noticelog`.
    pub silence_noticelog: bool,
    /// `-S`/`--vhost-sock-dir`.
    pub vhost_sock_dir: Option<PathBuf>,
    /// `-f` pidfile.
    pub pidfile: Option<PathBuf>,
    /// `--interrupt-mode`: reactors sleep when idle.
    pub interrupt_mode: bool,
    /// Runs inside another program's process (the fio engine): the program keeps its signal handlers and its
    /// threads' CPUs, so none are installed and reactors are not pinned. No command-line flag.
    pub embedded: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            config: None,
            json_ignore_init_errors: false,
            cpumask: CpuMask::single(0),
            main_core: None,
            rpc_socket: PathBuf::from(DEFAULT_RPC_SOCKET),
            no_rpc_server: false,
            rpcs_allowed: None,
            wait_for_rpc: false,
            mem_size_mb: None,
            no_huge: false,
            huge_dir: None,
            no_pci: false,
            pci_allowed: vec![],
            pci_blocked: vec![],
            log_flags: vec![],
            silence_noticelog: false,
            vhost_sock_dir: None,
            pidfile: None,
            interrupt_mode: false,
            embedded: false,
        }
    }
}

/// SPDK's default RPC socket.
pub const DEFAULT_RPC_SOCKET: &str = "/var/tmp/spdk.sock";

/// What the command line asks for.
#[derive(Debug)]
pub enum Action {
    /// Run the target.
    Run(Box<Opts>),
    /// Print usage and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// A command line error, naming the offending flag.
#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Arg {
    None,
    Required,
}

/// (short, long, takes an argument)
const OPTIONS: &[(Option<char>, &str, Arg)] = &[
    (Some('c'), "config", Arg::Required),
    (None, "json", Arg::Required),
    (None, "json-ignore-init-errors", Arg::None),
    (Some('d'), "limit-coredump", Arg::None),
    (Some('e'), "tpoint-group", Arg::Required),
    (Some('g'), "single-file-segments", Arg::None),
    (Some('h'), "help", Arg::None),
    (Some('i'), "shm-id", Arg::Required),
    (Some('m'), "cpumask", Arg::Required),
    (None, "lcores", Arg::Required),
    (Some('n'), "mem-channels", Arg::Required),
    (Some('p'), "main-core", Arg::Required),
    (Some('r'), "rpc-socket", Arg::Required),
    (Some('s'), "mem-size", Arg::Required),
    (None, "disable-cpumask-locks", Arg::None),
    (None, "interrupt-mode", Arg::None),
    (None, "silence-noticelog", Arg::None),
    (None, "msg-mempool-size", Arg::Required),
    (Some('u'), "no-pci", Arg::None),
    (None, "wait-for-rpc", Arg::None),
    (None, "max-delay", Arg::Required),
    (Some('B'), "pci-blocked", Arg::Required),
    (Some('A'), "pci-allowed", Arg::Required),
    (None, "pci-whitelist", Arg::Required),
    (None, "pci-blacklist", Arg::Required),
    (Some('R'), "huge-unlink", Arg::None),
    (Some('v'), "version", Arg::None),
    (None, "huge-dir", Arg::Required),
    (None, "iova-mode", Arg::Required),
    (None, "base-virtaddr", Arg::Required),
    (None, "num-trace-entries", Arg::Required),
    (None, "rpcs-allowed", Arg::Required),
    (None, "env-context", Arg::Required),
    (None, "vfio-vf-token", Arg::Required),
    (None, "no-huge", Arg::None),
    (None, "no-rpc-server", Arg::None),
    (None, "enforce-numa", Arg::None),
    (Some('L'), "logflag", Arg::Required),
    (Some('f'), "pidfile", Arg::Required),
    (Some('S'), "vhost-sock-dir", Arg::Required),
];

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, CliError> {
    let parsed = if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16)
            .ok()
            .and_then(|n| n.to_string().parse().ok())
    } else {
        v.parse().ok()
    };
    parsed.ok_or_else(|| CliError(format!("invalid value '{v}' for {flag}")))
}

/// Parses `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Action, CliError> {
    let mut o = Opts::default();
    let mut cpumask_set = false;
    let mut it = args.into_iter().peekable();
    while let Some(a) = it.next() {
        let (name, inline): (String, Option<String>) = if let Some(l) = a.strip_prefix("--") {
            match l.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (l.to_string(), None),
            }
        } else if let Some(s) = a.strip_prefix('-').filter(|s| !s.is_empty()) {
            let c = s.chars().next().unwrap_or('?');
            let rest = &s[c.len_utf8()..];
            let long = OPTIONS
                .iter()
                .find(|(sc, _, _)| *sc == Some(c))
                .map(|(_, l, _)| l.to_string())
                .ok_or_else(|| CliError(format!("unknown option -{c}")))?;
            (long, (!rest.is_empty()).then(|| rest.to_string()))
        } else {
            return Err(CliError(format!("unexpected argument '{a}'")));
        };
        let (_, long, kind) = OPTIONS
            .iter()
            .find(|(_, l, _)| *l == name)
            .ok_or_else(|| CliError(format!("unknown option --{name}")))?;
        let flag = format!("--{long}");
        let val = match kind {
            Arg::None => {
                if inline.is_some() {
                    return Err(CliError(format!("{flag} takes no argument")));
                }
                String::new()
            }
            Arg::Required => match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| CliError(format!("{flag} requires an argument")))?,
            },
        };
        match *long {
            "config" | "json" => o.config = Some(PathBuf::from(val)),
            "json-ignore-init-errors" => o.json_ignore_init_errors = true,
            "help" => return Ok(Action::Help),
            "version" => return Ok(Action::Version),
            "cpumask" => {
                o.cpumask = CpuMask::parse(&val).map_err(|e| CliError(format!("{flag}: {e}")))?;
                cpumask_set = true;
            }
            "main-core" => o.main_core = Some(number(&flag, &val)?),
            "rpc-socket" => o.rpc_socket = PathBuf::from(val),
            "no-rpc-server" => o.no_rpc_server = true,
            "rpcs-allowed" => {
                o.rpcs_allowed = Some(
                    val.split(',')
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                )
            }
            "wait-for-rpc" => o.wait_for_rpc = true,
            "mem-size" => o.mem_size_mb = Some(parse_mem_size(&flag, &val)?),
            "no-huge" => o.no_huge = true,
            "huge-dir" => o.huge_dir = Some(PathBuf::from(val)),
            "no-pci" => o.no_pci = true,
            "pci-allowed" | "pci-whitelist" => o.pci_allowed.push(val),
            "pci-blocked" | "pci-blacklist" => o.pci_blocked.push(val),
            "logflag" => o.log_flags.push(val),
            "silence-noticelog" => o.silence_noticelog = true,
            "vhost-sock-dir" => o.vhost_sock_dir = Some(PathBuf::from(val)),
            "pidfile" => o.pidfile = Some(PathBuf::from(val)),
            "interrupt-mode" => o.interrupt_mode = true,
            "shm-id" | "mem-channels" | "msg-mempool-size" | "max-delay" | "num-trace-entries" => {
                number::<i64>(&flag, &val)?;
            }
            "iova-mode" if !matches!(val.as_str(), "pa" | "va") => {
                return Err(CliError(format!("{flag} must be 'pa' or 'va'")))
            }
            // Accepted for compatibility; DPDK/trace/env details have no counterpart here.
            _ => {}
        }
    }
    if !o.pci_allowed.is_empty() && !o.pci_blocked.is_empty() {
        return Err(CliError("-B and -A cannot be used at the same time".into()));
    }
    if let Some(mc) = o.main_core {
        if !o.cpumask.contains(mc) {
            if cpumask_set {
                return Err(CliError(format!(
                    "main core {mc} is not in the core mask {}",
                    o.cpumask
                )));
            }
            o.cpumask = CpuMask::single(mc);
        }
    }
    Ok(Action::Run(Box::new(o)))
}

/// `-s` accepts a plain number of MiB or a size with a unit (`1G`, `512M`).
fn parse_mem_size(flag: &str, v: &str) -> Result<u64, CliError> {
    let (num, mult) = match v.chars().last() {
        Some('G' | 'g') => (&v[..v.len() - 1], 1024),
        Some('M' | 'm') => (&v[..v.len() - 1], 1),
        Some('K' | 'k') => return number::<u64>(flag, &v[..v.len() - 1]).map(|k| k.div_ceil(1024)),
        _ => (v, 1),
    };
    number::<u64>(flag, num).map(|n| n * mult)
}

/// The usage text, laid out as SPDK's.
pub fn usage(prog: &str) -> String {
    format!(
        "{prog} [options]\n\n\
CPU options:\n\
 -m, --cpumask <mask or list>    core mask (like 0xF) or core list of '[]' embraced for DPDK\n\
                                 (like [0,1,10])\n\
 -p, --main-core <id>      main (primary) core for DPDK\n\
     --interrupt-mode      set app to interrupt mode (reactors sleep when idle)\n\
\n\
Configuration options:\n\
 -c, --config, --json  <config>     JSON config file\n\
 -r, --rpc-socket <path>   RPC listen address (default {DEFAULT_RPC_SOCKET})\n\
     --no-rpc-server       skip RPC server initialization. This option ignores '--rpc-socket' value.\n\
     --wait-for-rpc        wait for RPCs to initialize subsystems\n\
     --rpcs-allowed        comma-separated list of permitted RPCS\n\
     --json-ignore-init-errors    don't exit on invalid config entry\n\
\n\
Memory options:\n\
 -s, --mem-size <size>     memory size in MB for DPDK (default: 0MB)\n\
     --no-huge             run without using hugepages\n\
     --huge-dir <path>     use a specific hugetlbfs mount to reserve memory from\n\
 -R, --huge-unlink         unlink huge files after initialization\n\
 -n, --mem-channels <num>  number of memory channels used for DPDK\n\
 -i, --shm-id <id>         shared memory ID (optional)\n\
 -g, --single-file-segments   force creating just one hugetlbfs file\n\
     --iova-mode <pa/va>   set IOVA mode ('pa' for IOVA_PA and 'va' for IOVA_VA)\n\
     --base-virtaddr <addr>      the base virtual address for DPDK (default: 0x200000000000)\n\
\n\
PCI options:\n\
 -A, --pci-allowed <bdf>   pci addr to allow (-B and -A cannot be used at the same time)\n\
 -B, --pci-blocked <bdf>   pci addr to block (can be used more than once)\n\
 -u, --no-pci              disable PCI access\n\
     --vfio-vf-token       VF token (UUID) shared between SR-IOV PF and VFs for vfio_pci driver\n\
\n\
Log options:\n\
 -L, --logflag <flag>      enable log flag (all, {flags})\n\
     --silence-noticelog   disable notice level logging to stderr\n\
\n\
Trace options:\n\
     --num-trace-entries <num>   number of trace entries for each core (accepted, unused)\n\
 -e, --tpoint-group <group-name>[:<tpoint_mask>]   (accepted, unused)\n\
\n\
Other options:\n\
 -h, --help                show this usage\n\
 -v, --version             print SPDK version\n\
 -d, --limit-coredump      do not set max coredump size to RLIM_INFINITY\n\
     --env-context         Opaque context for use of the env implementation\n\
\n\
Application specific:\n\
 -f <file>                 pidfile\n\
 -S <path>                 directory where to create vhost sockets (default: pwd)\n",
        flags = crate::logging::FLAGS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Opts, CliError> {
        match parse(args.iter().map(|s| s.to_string()))? {
            Action::Run(o) => Ok(*o),
            a => panic!("{a:?}"),
        }
    }

    #[test]
    fn spdk_command_lines_parse() {
        let o = run(&[
            "-m",
            "0x3",
            "-r",
            "/tmp/x.sock",
            "-c",
            "a.json",
            "-L",
            "bdev",
            "-Lrpc",
            "--wait-for-rpc",
        ])
        .unwrap();
        assert_eq!(o.cpumask.to_string(), "0x3");
        assert_eq!(o.rpc_socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(o.config, Some(PathBuf::from("a.json")));
        assert_eq!(o.log_flags, vec!["bdev", "rpc"]);
        assert!(o.wait_for_rpc);
        let o = run(&[
            "--cpumask=[0,1]",
            "--json",
            "b.json",
            "-s",
            "1G",
            "--no-huge",
            "-i",
            "0",
            "-n",
            "4",
            "-e",
            "0xffff",
            "--iova-mode=va",
            "--base-virtaddr",
            "0x200000000000",
            "--env-context",
            "--foo",
            "-R",
            "-g",
        ])
        .unwrap();
        assert_eq!(o.cpumask.to_string(), "0x3");
        assert_eq!(o.mem_size_mb, Some(1024));
        assert!(o.no_huge);
        let o = run(&["-p", "1"]).unwrap();
        assert_eq!(
            o.cpumask.to_string(),
            "0x2",
            "main core alone selects its core"
        );
        let o = run(&[
            "--rpcs-allowed",
            "a,b",
            "-f",
            "/tmp/pid",
            "-S",
            "/tmp/vh",
            "--no-rpc-server",
        ])
        .unwrap();
        assert_eq!(o.rpcs_allowed, Some(vec!["a".into(), "b".into()]));
        assert!(o.no_rpc_server);
        assert!(matches!(parse(["-h".to_string()]).unwrap(), Action::Help));
        assert!(matches!(
            parse(["--version".to_string()]).unwrap(),
            Action::Version
        ));
    }

    #[test]
    fn bad_flags_name_the_problem() {
        assert_eq!(run(&["-x"]).unwrap_err().0, "unknown option -x");
        assert_eq!(run(&["--bogus"]).unwrap_err().0, "unknown option --bogus");
        assert_eq!(
            run(&["-m"]).unwrap_err().0,
            "--cpumask requires an argument"
        );
        assert!(run(&["-m", "zz"]).unwrap_err().0.contains("--cpumask"));
        assert!(run(&["-m", "0x1", "-p", "3"])
            .unwrap_err()
            .0
            .contains("main core 3"));
        assert!(run(&["-A", "0000:00:01.0", "-B", "0000:00:02.0"]).is_err());
        assert!(run(&["--no-huge=1"])
            .unwrap_err()
            .0
            .contains("takes no argument"));
        assert!(run(&["-s", "lots"]).unwrap_err().0.contains("--mem-size"));
        assert!(run(&["stray"]).is_err());
    }
}
