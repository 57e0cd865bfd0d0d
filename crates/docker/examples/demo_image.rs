//! The container part of `cargo xtask demo`: build the demo image on the
//! local engine (`FROM scratch` busybox, no registry; see
//! `fleet_docker::testimage`), and afterwards remove what the demo left.
//!
//! ```text
//! demo_image build TAG RELEASE     # prints the tag
//! demo_image clean DESTINATION     # removes Fleet's containers of that destination
//! ```
//!
//! Exit 0 on success, 3 when no Docker Engine is reachable (the demo then
//! skips its container part), 1 on any other error.

use std::time::Duration;

use fleet_docker::testimage::{build_web_image, WebImage};
use fleet_docker::{Engine, LabelFilter};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let engine = match Engine::connect().await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("no Docker Engine: {e}");
            std::process::exit(3);
        }
    };
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["build", tag, release] => build_web_image(&engine, &WebImage::new(*tag, *release)).await.map(|t| println!("{t}")),
        ["clean", destination] => clean(&engine, destination).await,
        _ => {
            eprintln!("usage: demo_image build TAG RELEASE | demo_image clean DESTINATION");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

async fn clean(engine: &Engine, destination: &str) -> Result<(), fleet_docker::DockerError> {
    for c in engine.list(&LabelFilter::managed().destination(destination)).await? {
        engine.stop_and_remove(&c.name, Duration::from_secs(2)).await?;
        println!("removed container {}", c.name);
    }
    Ok(())
}
