//! `kd-lab`: bring a virtual PXE cluster up and down, drive its virtual BMC.

fn main() -> std::process::ExitCode {
    kd_lab::cli::main()
}
