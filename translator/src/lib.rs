//! btvmm-translator: guest x86 bytes in, compiled code fragments out.
//!
//! Today this crate holds the ABI of translated code ([`abi`]): the register
//! block shared by the interpreter and (later) the binary translator.

pub mod abi;
