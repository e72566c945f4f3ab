#[allow(dead_code)]
mod boot;

fn main() {}
