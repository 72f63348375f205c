//! `spdk_tgt`: drop-in replacement for SPDK's storage target.

fn main() {
    let prog = std::env::args().next().unwrap_or_else(|| "spdk_tgt".into());
    match app::cli::parse(std::env::args().skip(1)) {
        Ok(app::cli::Action::Help) => print!("{}", app::cli::usage(&prog)),
        Ok(app::cli::Action::Version) => {
            let (ma, mi, pa) = app::VERSION;
            println!(
                "SPDK v{ma}.{mi:02}{} (rust drop-in {})",
                if pa > 0 {
                    format!(".{pa}")
                } else {
                    String::new()
                },
                env!("CARGO_PKG_VERSION")
            );
        }
        Ok(app::cli::Action::Run(opts)) => {
            if let Err(e) = app::run(*opts, app::spdk_tgt_subsystems()) {
                eprintln!("spdk_tgt: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("{prog}: {e}");
            eprint!("{}", app::cli::usage(&prog));
            std::process::exit(1);
        }
    }
}
