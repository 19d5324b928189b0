//! Link settings of the `vmm` binary.

fn main() {
    // Relative relocations packed (DT_RELR, glibc 2.36 and later): the table the dynamic
    // loader reads at every start shrinks from ~170 KiB to a few, and so does what of it stays
    // resident.
    println!("cargo:rustc-link-arg-bin=vmm=-Wl,-z,pack-relative-relocs");
}
