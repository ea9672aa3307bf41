//! Builds the eBPF object (crate `lb-ebpf`) for the BPF target with aya-build; the userspace
//! crate embeds it with `aya::include_bytes_aligned!`.
fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-userspace lives inside the workspace")
        .join("lb-ebpf");
    let root = root.to_str().expect("workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
