//! Builds the agent's one piece of C: the COM half of the VSS provider, for Windows targets
//! only (`native/vss_windows.c`; see `src/vss_windows.rs`).

fn main() {
    println!("cargo:rerun-if-changed=native/vss_windows.c");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("windows") {
        return;
    }
    cc::Build::new()
        .file("native/vss_windows.c")
        .warnings(true)
        .compile("lifeboat_vss");
    for lib in ["vssapi", "ole32", "oleaut32"] {
        println!("cargo:rustc-link-lib={lib}");
    }
}
