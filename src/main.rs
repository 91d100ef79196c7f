/// mimalloc: the executor allocates many small strings and maps per step, where glibc's
/// allocator spent about half of the in-memory step time (measured with perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    lar_worker::cli::main()
}
