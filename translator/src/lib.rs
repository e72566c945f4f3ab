//! btvmm-translator: guest x86 bytes in, compiled code fragments out.
//!
//! Today this crate holds the ABI of translated code ([`abi`]), the register
//! block shared by the interpreter and the binary translator, and the
//! classification table ([`classify`]) the translator will emit from.

pub mod abi;
pub mod classify;
