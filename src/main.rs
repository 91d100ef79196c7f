fn main() -> std::process::ExitCode {
    lar_worker::cli::main()
}
