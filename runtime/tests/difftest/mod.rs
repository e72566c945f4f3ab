//! Differential testing of user-level x86-64 semantics: the same instruction
//! sequence runs on the host CPU (the oracle, `native`) and on an executor
//! under test; registers, the compared flags (masked where the SDM leaves them
//! undefined), the data window and faults must agree.
//!
//! - `machine`: the `Executor` trait, `MachineState`, `Outcome`, the layout.
//! - `native`: the host CPU in a forked child.
//! - `forms`, `compound`, `sequence`: generators, built with iced-x86.
//! - `flags`: which flags are undefined where.
//! - `compare`, `runner`: diffs, reports, `run_differential`.
//!
//! Wiring a new executor (the interpreter, the translator): implement
//! `machine::Executor` and call `runner::run_differential(&mut it, &mut
//! NativeExecutor::new()?, &Config::full())`; see `tests/differential.rs`.

pub mod compare;
pub mod compound;
pub mod flags;
pub mod forms;
pub mod interp;
pub mod machine;
pub mod native;
pub mod rng;
pub mod runner;
pub mod sequence;
