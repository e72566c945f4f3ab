//! btvmm-translator: guest x86 bytes in, compiled code fragments out.
//!
//! This crate owns the ABI of translated code ([`abi`]): the register block
//! shared by the interpreter and the binary translator, and the block the
//! host GS base points at while a compiled code fragment (CCF) runs. It
//! classifies every instruction form ([`classify`]), holds the fixed code
//! templates ([`templates`]) and turns a translation unit of guest code into
//! a CCF ([`translate`]). It never touches guest memory or the vCPU itself:
//! bytes in, code and metadata out, so it can be tested alone.

pub mod abi;
pub mod classify;
pub mod templates;
pub mod translate;
