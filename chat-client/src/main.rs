fn main() {
    eprintln!(
        "chat-client is not usable yet: the client core and GUI are being built.\n\
         For now, run the relay with `cargo run -p chat-server`."
    );
    std::process::exit(2);
}
