fn main() {
    eprintln!("vmm: not built yet");
    std::process::exit(2);
}
