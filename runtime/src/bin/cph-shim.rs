//! `cph-shim`: the per-phone monitor and exec helper (see `cph_runtime::container::shim`).

fn main() {
    let args: Vec<String> = std::env::args().collect();
    std::process::exit(cph_runtime::container::shim::shim_main(&args));
}
