//! The software MMU: guest linear -> guest physical translation.
//!
//! Page walks for 32-bit (2-level, 4 KiB and 4 MiB pages), PAE (3-level) and
//! 4-level paging with 2 MiB and 1 GiB pages, A/D bit updates, U/S and R/W
//! checks with CR0.WP, NX with EFER.NXE, reserved-bit checks, and #PF error
//! codes as hardware reports them (SDM Vol. 3A, chapter 4). The soft TLB in
//! [`tlb`] caches the results.

pub mod tlb;

use crate::cpu::{cr0, cr4, efer, Cpu};
use crate::exception::Exception;
use crate::memory::GuestMemory;

/// Kind of access, as the page walk and the soft TLB distinguish them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read = 0,
    Write = 1,
    Execute = 2,
}

/// #PF error-code bits.
pub mod pf {
    pub const P: u32 = 1 << 0;
    pub const W: u32 = 1 << 1;
    pub const U: u32 = 1 << 2;
    pub const RSVD: u32 = 1 << 3;
    pub const I: u32 = 1 << 4;
}

const PTE_P: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_U: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;
const PTE_G: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub phys: u64,
    /// The mapping is global (G bit with CR4.PGE): kept across CR3 writes.
    pub global: bool,
    /// The size of the page the mapping came from (4 KiB, 2 or 4 MiB, 1 GiB).
    pub page_size: u64,
}

/// The paging-structure entries a walk went through, root first:
/// (address, value, 8 bytes wide). At most four levels.
struct Levels {
    at: [(u64, u64, bool); 4],
    len: usize,
}

impl Levels {
    fn new() -> Self {
        Levels { at: [(0, 0, false); 4], len: 0 }
    }

    fn push(&mut self, e: (u64, u64, bool)) {
        self.at[self.len] = e;
        self.len += 1;
    }

    fn as_slice(&self) -> &[(u64, u64, bool)] {
        &self.at[..self.len]
    }
}

/// Physical-address width for reserved-bit checks.
fn max_phys_bits() -> u32 {
    use std::sync::OnceLock;
    static BITS: OnceLock<u32> = OnceLock::new();
    *BITS.get_or_init(|| {
        let r = core::arch::x86_64::__cpuid(0x8000_0008);
        (r.eax & 0xff).clamp(36, 52)
    })
}

fn phys_mask() -> u64 {
    ((1u64 << max_phys_bits()) - 1) & !0xfff
}

/// Translates `lin` for an access of `kind`; `user` is a CPL-3 (non-implicit) access.
pub fn translate(
    cpu: &Cpu,
    mem: &GuestMemory,
    lin: u64,
    kind: Access,
    user: bool,
) -> Result<Translation, Exception> {
    walk(Walker { cpu, mem, lin, kind, user, mark: true })
}

/// As [`translate`], without setting accessed or dirty bits: a look ahead
/// at a mapping the guest may never use.
pub fn peek(cpu: &Cpu, mem: &GuestMemory, lin: u64, kind: Access, user: bool) -> Result<Translation, Exception> {
    walk(Walker { cpu, mem, lin, kind, user, mark: false })
}

fn walk(w: Walker) -> Result<Translation, Exception> {
    let cpu = w.cpu;
    if cpu.cr0 & cr0::PG == 0 {
        let phys = if cpu.efer & efer::LMA != 0 { w.lin } else { w.lin & 0xffff_ffff };
        return Ok(Translation { phys, global: false, page_size: 0x1000 });
    }
    if cpu.cr4 & cr4::PAE == 0 {
        w.walk32()
    } else if cpu.efer & efer::LMA != 0 {
        w.walk64()
    } else {
        w.walk_pae()
    }
}

struct Walker<'a> {
    cpu: &'a Cpu,
    mem: &'a GuestMemory,
    lin: u64,
    kind: Access,
    user: bool,
    /// Sets the accessed and dirty bits (not for a `peek`).
    mark: bool,
}

/// Accumulated permissions over the levels of a walk.
struct Perm {
    user: bool,
    write: bool,
    nx: bool,
}

impl Walker<'_> {
    fn fault(&self, code: u32) -> Exception {
        let mut code = code;
        if self.kind == Access::Write {
            code |= pf::W;
        }
        if self.user {
            code |= pf::U;
        }
        let nx_paging = self.cpu.cr4 & cr4::PAE != 0 && self.cpu.efer & efer::NXE != 0;
        if self.kind == Access::Execute && nx_paging {
            code |= pf::I;
        }
        Exception::pf(self.lin, code)
    }

    fn not_present(&self) -> Exception {
        self.fault(0)
    }

    fn reserved(&self) -> Exception {
        self.fault(pf::P | pf::RSVD)
    }

    /// Checks the accumulated permissions, then sets A (and D at the leaf).
    fn finish(&self, perm: Perm, entries: &[(u64, u64, bool)], leaf_phys: u64, global: bool, page_size: u64)
        -> Result<Translation, Exception> {
        let wp = self.cpu.cr0 & cr0::WP != 0;
        let denied = (self.user && !perm.user)
            || (self.kind == Access::Write && !perm.write && (self.user || wp))
            || (self.kind == Access::Execute && perm.nx);
        if denied {
            return Err(self.fault(pf::P));
        }
        for (i, &(addr, val, wide)) in entries.iter().enumerate().filter(|_| self.mark) {
            let leaf = i == entries.len() - 1;
            let mut new = val | PTE_A;
            if leaf && self.kind == Access::Write {
                new |= PTE_D;
            }
            if new != val {
                if wide {
                    self.mem.write_u64(addr, new);
                } else {
                    self.mem.write_u32(addr, new as u32);
                }
            }
        }
        let global = global && self.cpu.cr4 & cr4::PGE != 0;
        Ok(Translation { phys: leaf_phys, global, page_size })
    }

    fn walk32(&self) -> Result<Translation, Exception> {
        let lin = self.lin & 0xffff_ffff;
        let pde_addr = (self.cpu.cr3 & 0xffff_f000) + ((lin >> 22) << 2);
        let pde = self.mem.read_u32(pde_addr) as u64;
        if pde & PTE_P == 0 {
            return Err(self.not_present());
        }
        if pde & PTE_PS != 0 && self.cpu.cr4 & cr4::PSE != 0 {
            if pde & (1 << 21) != 0 {
                return Err(self.reserved());
            }
            let high = ((pde >> 13) & 0xff) << 32;
            let phys = (pde & 0xffc0_0000) | high | (lin & 0x3f_ffff);
            let perm = Perm { user: pde & PTE_U != 0, write: pde & PTE_W != 0, nx: false };
            return self.finish(perm, &[(pde_addr, pde, false)], phys, pde & PTE_G != 0, 0x40_0000);
        }
        let pte_addr = (pde & 0xffff_f000) + (((lin >> 12) & 0x3ff) << 2);
        let pte = self.mem.read_u32(pte_addr) as u64;
        if pte & PTE_P == 0 {
            return Err(self.not_present());
        }
        let perm = Perm {
            user: pde & pte & PTE_U != 0,
            write: pde & pte & PTE_W != 0,
            nx: false,
        };
        let phys = (pte & 0xffff_f000) | (lin & 0xfff);
        self.finish(perm, &[(pde_addr, pde, false), (pte_addr, pte, false)], phys, pte & PTE_G != 0, 0x1000)
    }

    /// Reserved bits of a PAE/4-level entry above MAXPHYADDR, plus NX without NXE.
    fn rsvd_high(&self, e: u64) -> bool {
        let nx_rsvd = if self.cpu.efer & efer::NXE == 0 { PTE_NX } else { 0 };
        let high = !(phys_mask() | 0xfff) & !PTE_NX & !(0x7ffu64 << 52);
        e & (high | nx_rsvd) != 0
    }

    fn walk_pae(&self) -> Result<Translation, Exception> {
        let lin = self.lin & 0xffff_ffff;
        let pdpte_addr = (self.cpu.cr3 & 0xffff_ffe0) + ((lin >> 30) << 3);
        let pdpte = self.mem.read_u64(pdpte_addr);
        if pdpte & PTE_P == 0 {
            return Err(self.not_present());
        }
        // PAE PDPTEs have no A, U/S, R/W or NX bits: bits 1-2, 5-8 and 63 are reserved.
        if pdpte & (0x1e6 | PTE_NX) != 0 || self.rsvd_high(pdpte) {
            return Err(self.reserved());
        }
        self.walk_lower(pdpte & phys_mask(), Perm { user: true, write: true, nx: false }, Levels::new())
    }

    fn walk64(&self) -> Result<Translation, Exception> {
        let lin = self.lin;
        let mut entries = Levels::new();
        let pml4_addr = (self.cpu.cr3 & phys_mask()) + (((lin >> 39) & 0x1ff) << 3);
        let pml4e = self.mem.read_u64(pml4_addr);
        if pml4e & PTE_P == 0 {
            return Err(self.not_present());
        }
        if pml4e & PTE_PS != 0 || self.rsvd_high(pml4e) {
            return Err(self.reserved());
        }
        entries.push((pml4_addr, pml4e, true));
        let mut perm = self.perm_of(pml4e);
        let pdpt_addr = (pml4e & phys_mask()) + (((lin >> 30) & 0x1ff) << 3);
        let pdpte = self.mem.read_u64(pdpt_addr);
        if pdpte & PTE_P == 0 {
            return Err(self.not_present());
        }
        if self.rsvd_high(pdpte) {
            return Err(self.reserved());
        }
        entries.push((pdpt_addr, pdpte, true));
        self.merge(&mut perm, pdpte);
        if pdpte & PTE_PS != 0 {
            if pdpte & 0x3fff_e000 != 0 {
                return Err(self.reserved());
            }
            let phys = (pdpte & phys_mask() & !0x3fff_ffff) | (lin & 0x3fff_ffff);
            return self.finish(perm, entries.as_slice(), phys, pdpte & PTE_G != 0, 0x4000_0000);
        }
        self.walk_lower(pdpte & phys_mask(), perm, entries)
    }

    fn perm_of(&self, e: u64) -> Perm {
        Perm {
            user: e & PTE_U != 0,
            write: e & PTE_W != 0,
            nx: e & PTE_NX != 0 && self.cpu.efer & efer::NXE != 0,
        }
    }

    fn merge(&self, p: &mut Perm, e: u64) {
        let q = self.perm_of(e);
        p.user &= q.user;
        p.write &= q.write;
        p.nx |= q.nx;
    }

    /// The page-directory and page-table levels shared by PAE and 4-level paging.
    fn walk_lower(&self, pd_base: u64, mut perm: Perm, mut entries: Levels)
        -> Result<Translation, Exception> {
        let lin = self.lin;
        let pde_addr = pd_base + (((lin >> 21) & 0x1ff) << 3);
        let pde = self.mem.read_u64(pde_addr);
        if pde & PTE_P == 0 {
            return Err(self.not_present());
        }
        if self.rsvd_high(pde) {
            return Err(self.reserved());
        }
        entries.push((pde_addr, pde, true));
        self.merge(&mut perm, pde);
        if pde & PTE_PS != 0 {
            if pde & 0x1f_e000 != 0 {
                return Err(self.reserved());
            }
            let phys = (pde & phys_mask() & !0x1f_ffff) | (lin & 0x1f_ffff);
            return self.finish(perm, entries.as_slice(), phys, pde & PTE_G != 0, 0x20_0000);
        }
        let pte_addr = (pde & phys_mask()) + (((lin >> 12) & 0x1ff) << 3);
        let pte = self.mem.read_u64(pte_addr);
        if pte & PTE_P == 0 {
            return Err(self.not_present());
        }
        if self.rsvd_high(pte) {
            return Err(self.reserved());
        }
        entries.push((pte_addr, pte, true));
        self.merge(&mut perm, pte);
        let phys = (pte & phys_mask()) | (lin & 0xfff);
        self.finish(perm, entries.as_slice(), phys, pte & PTE_G != 0, 0x1000)
    }
}

#[cfg(test)]
mod tests;
