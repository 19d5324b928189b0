fn main() {
    eprintln!("storaged: not built yet");
    std::process::exit(2);
}
