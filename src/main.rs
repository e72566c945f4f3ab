// The devices and the board are wired in by the machine loop (another branch).
#[allow(dead_code)]
mod board;
#[allow(dead_code)]
mod devices;

fn main() {}
