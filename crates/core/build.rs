//! Compiles `proto/rpm/v1/*.proto` with protox (pure Rust), so no system
//! `protoc` is needed to build vitalwatch.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("rpm/v1/readings.proto"),
        root.join("rpm/v1/alerts.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
