pub mod multiboot;
pub mod linux;
