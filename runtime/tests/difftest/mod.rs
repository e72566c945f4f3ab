//! Differential testing: run the same instruction sequence on the host CPU
//! and on an executor under test, compare registers, flags, the data window
//! and faults.
pub mod machine;
pub mod native;
