use super::*;
use crate::cpu::{cr0, cr4, efer, Cpu};

fn setup() -> (Cpu, GuestMemory) {
    let mut cpu = Cpu::new();
    cpu.set_flat_protected32(0);
    (cpu, GuestMemory::new(16 << 20).unwrap())
}

#[test]
fn walk32_maps_4k_page_and_sets_accessed_and_dirty() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr0 |= cr0::PG;
    mem.write_u32(0x10000 + (0x40 << 2), 0x11000 | 7); // PDE for 0x1000_0000
    mem.write_u32(0x11000 + (5 << 2), 0x20_0000 | 7); // PTE for page 5
    let t = translate(&cpu, &mem, 0x1000_5123, Access::Write, false).unwrap();
    assert_eq!(t.phys, 0x20_0123);
    assert_eq!(mem.read_u32(0x10000 + (0x40 << 2)) & 0x60, 0x20);
    assert_eq!(mem.read_u32(0x11000 + (5 << 2)) & 0x60, 0x60);
}

#[test]
fn walk32_not_present_gives_pf_with_cr2_and_code() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr0 |= cr0::PG;
    let e = translate(&cpu, &mem, 0xdead_b000, Access::Write, true).unwrap_err();
    assert_eq!(e.vector, 14);
    assert_eq!(e.address, 0xdead_b000);
    assert_eq!(e.error_code, Some(pf::W | pf::U));
}

#[test]
fn walk32_pse_4m_page_and_write_protect_rules() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr0 |= cr0::PG;
    cpu.cr4 |= cr4::PSE;
    mem.write_u32(0x10000 + (1 << 2), 0x0080_0000 | 0x80 | 1 | 4); // 4M, read-only, user
    let t = translate(&cpu, &mem, 0x0040_1234, Access::Read, true).unwrap();
    assert_eq!(t.phys, 0x0080_1234);
    assert_eq!(t.page_size, 0x40_0000);
    // Supervisor write to a read-only page succeeds without WP, faults with it.
    assert!(translate(&cpu, &mem, 0x0040_1234, Access::Write, false).is_ok());
    cpu.cr0 |= cr0::WP;
    let e = translate(&cpu, &mem, 0x0040_1234, Access::Write, false).unwrap_err();
    assert_eq!(e.error_code, Some(pf::P | pf::W));
}

#[test]
fn walk_pae_nx_page_faults_on_fetch_with_i_bit() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr4 |= cr4::PAE;
    cpu.cr0 |= cr0::PG;
    cpu.efer |= efer::NXE;
    mem.write_u64(0x10000, 0x11000 | 1);
    mem.write_u64(0x11000, 0x12000 | 3);
    mem.write_u64(0x12000 + 8, 0x30_0000 | 3 | (1 << 63));
    assert_eq!(translate(&cpu, &mem, 0x1008, Access::Read, false).unwrap().phys, 0x30_0008);
    let e = translate(&cpu, &mem, 0x1008, Access::Execute, false).unwrap_err();
    assert_eq!(e.error_code, Some(pf::P | pf::I));
}

#[test]
fn walk_pae_nx_bit_without_nxe_is_reserved() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr4 |= cr4::PAE;
    cpu.cr0 |= cr0::PG;
    mem.write_u64(0x10000, 0x11000 | 1);
    mem.write_u64(0x11000, 0x12000 | 3);
    mem.write_u64(0x12000, 0x30_0000 | 3 | (1 << 63));
    let e = translate(&cpu, &mem, 0x0, Access::Read, false).unwrap_err();
    assert_eq!(e.error_code, Some(pf::P | pf::RSVD));
}

#[test]
fn walk64_1g_and_2m_pages() {
    let (mut cpu, mem) = setup();
    cpu.cr3 = 0x10000;
    cpu.cr4 |= cr4::PAE;
    cpu.efer |= efer::LME | efer::LMA;
    cpu.cr0 |= cr0::PG;
    mem.write_u64(0x10000, 0x11000 | 7);
    mem.write_u64(0x11000, 0x4000_0000 | 0x83); // 1G at 0, supervisor
    mem.write_u64(0x11000 + 8, 0x12000 | 7);
    mem.write_u64(0x12000 + 8, 0x60_0000 | 0x87); // 2M user page at 0x4020_0000
    assert_eq!(translate(&cpu, &mem, 0x1234_5678, Access::Read, false).unwrap().phys, 0x5234_5678);
    let e = translate(&cpu, &mem, 0x1234_5678, Access::Read, true).unwrap_err();
    assert_eq!(e.error_code, Some(pf::P | pf::U));
    assert_eq!(translate(&cpu, &mem, 0x4020_0010, Access::Write, true).unwrap().phys, 0x60_0010);
}
