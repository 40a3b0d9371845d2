//! `unbusy-store`: see `docs/store.md`. Prints `listening on ADDR` on stdout once it accepts.

use std::io::Write;
use unbusy_store::config::{Settings, USAGE};
use unbusy_store::server::Bound;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let settings = match Settings::parse(&args, &|k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("unbusy-store: {e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("unbusy-store: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(settings)) {
        eprintln!("unbusy-store: {e}");
        std::process::exit(1);
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let bound = Bound::bind(settings).await?;
    let addr = bound.local_addr()?;
    let settings = bound.settings();
    eprintln!(
        "unbusy-store: redis {}, prefix {:?}, timeout {} ms",
        settings.redis.describe(),
        settings.prefix,
        settings.timeout.as_millis()
    );
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
        }
    };
    bound.serve(shutdown).await;
    Ok(())
}
