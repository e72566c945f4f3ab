//! The soft TLB (DESIGN.md, "Memory"), in the manner of QEMU's softmmu.
//!
//! One two-way set-associative table per access kind (read, write,
//! execute) and per privilege (supervisor, user): a fill moves the entry it
//! displaces to the second way, so two pages whose numbers agree in the
//! index bits (a stack and the data a loop walks) do not evict each other. An entry maps a 4 KiB linear page to a host
//! address by an addend: `host = linear + addend`. Only pages in guest RAM
//! are ever entered, and a write entry is never filled for a page that holds
//! decoded or translated code, so such writes take the slow path, which
//! invalidates the code.

use rustc_hash::FxHashSet;
use super::{Access, Translation};

use btvmm_translator::abi::tlb::{empty_tag, stored_tag};

pub const TLB_SIZE: usize = btvmm_translator::abi::tlb::ENTRIES;

/// One cached translation, as the runtime reads it.
#[derive(Clone, Copy, Debug)]
pub struct TlbEntry {
    /// Linear page address, or `empty_tag(index)` (which no lookup that
    /// reaches this entry can match).
    pub tag: u64,
    /// host address minus linear address.
    pub addend: u64,
    /// The physical page (`u64::MAX` when empty).
    pub phys_page: u64,
    pub global: bool,
}

/// Entries per table: both ways, the second after the first
/// (`btvmm_translator::abi::tlb::OFF_WAY2`).
const TABLE_ENTRIES: usize = 2 * TLB_SIZE;

/// One table, laid out as `btvmm_translator::abi::tlb` says (CCFs probe
/// its tags and addends inline): each field an array over both ways.
#[repr(C)]
struct Table {
    /// `stored_tag(page)`: the page complemented.
    tags: [u64; TABLE_ENTRIES],
    addends: [u64; TABLE_ENTRIES],
    phys_pages: [u64; TABLE_ENTRIES],
    globals: [bool; TABLE_ENTRIES],
}

impl Table {
    fn empty() -> Self {
        Table {
            tags: std::array::from_fn(|i| stored_tag(empty_tag(i % TLB_SIZE))),
            addends: [0; TABLE_ENTRIES],
            phys_pages: [u64::MAX; TABLE_ENTRIES],
            globals: [false; TABLE_ENTRIES],
        }
    }

    fn get(&self, at: usize) -> TlbEntry {
        TlbEntry { tag: !self.tags[at], addend: self.addends[at], phys_page: self.phys_pages[at], global: self.globals[at] }
    }

    fn set(&mut self, at: usize, e: TlbEntry) {
        self.tags[at] = stored_tag(e.tag);
        self.addends[at] = e.addend;
        self.phys_pages[at] = e.phys_page;
        self.globals[at] = e.global;
    }

    fn clear(&mut self, at: usize) {
        self.set(at, TlbEntry { tag: empty_tag(at % TLB_SIZE), addend: 0, phys_page: u64::MAX, global: false });
    }

    /// Whether the entry at `at` maps linear page `page`.
    fn maps(&self, at: usize, page: u64) -> bool {
        self.tags[at] == stored_tag(page)
    }
}

/// A set of table sets (indices below `TLB_SIZE`), each listed once.
struct SetList {
    list: Vec<u16>,
    listed: [u64; TLB_SIZE / 64],
}

impl SetList {
    fn new() -> Self {
        SetList { list: Vec::new(), listed: [0; TLB_SIZE / 64] }
    }

    fn insert(&mut self, i: usize) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.listed[word] & bit == 0 {
            self.listed[word] |= bit;
            self.list.push(i as u16);
        }
    }

    /// Empties the set, yielding what it held.
    fn drain(&mut self) -> impl Iterator<Item = usize> + '_ {
        self.listed = [0; TLB_SIZE / 64];
        self.list.drain(..).map(usize::from)
    }
}

pub struct Tlb {
    /// Indexed `[user as usize * 3 + kind as usize]`, then by
    /// `way * TLB_SIZE + (page & (TLB_SIZE-1))`.
    tables: Box<[Table]>,
    /// The large pages (linear base, size) with pieces entered since the
    /// last full flush: an `invlpg` inside one drops all of its 4 KiB
    /// entries (a large mapping is spread over many), one elsewhere drops
    /// a single page. (One region covering them all, as QEMU keeps, spans
    /// the kernel's whole half in a 64-bit guest: every `invlpg` of a
    /// vmalloc page flushed everything, 17k times in an amd64 boot.)
    large: FxHashSet<(u64, u64)>,
    /// Which tables hold entries (`[user][kind]`): flushes skip the others.
    used: [[bool; 3]; 2],
    /// Per table, the sets a non-global entry was filled into since the
    /// last flush of non-global entries: all that such a flush (a CR3
    /// write) must look at. Scanning every entry of every table cost 1.3%
    /// of an amd64 boot's time over its 17k CR3 writes.
    nonglobal: Box<[SetList]>,
    pub flushes: u64,
    /// `invlpg`s that dropped a single page.
    pub page_invalidations: u64,
    /// Bumped whenever a mapping is dropped (flush, invlpg): what was looked
    /// up through the TLB before may be stale after.
    pub generation: u64,
    /// What each of the last `JOURNAL` generation changes dropped, at
    /// `generation % JOURNAL`: users of cached translations (the IBTC) drop
    /// just what went, or everything if they fell further behind.
    journal: [Dropped; JOURNAL],
}

/// How many generation changes the journal remembers.
const JOURNAL: usize = 16;

/// What a generation change dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Every mapping.
    All,
    /// Every non-global mapping (a CR3 write).
    NonGlobal,
    /// The mapping of one 4 KiB linear page.
    Page(u64),
    /// The mappings of one large page: (linear base, size).
    Large(u64, u64),
}

/// The sizes of large pages: 2 MiB (PAE, long mode), 4 MiB (32-bit paging), 1 GiB.
const LARGE_SIZES: [u64; 3] = [0x20_0000, 0x40_0000, 0x4000_0000];

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl Tlb {
    pub fn new() -> Self {
        let tables = (0..6).map(|_| Table::empty()).collect();
        let nonglobal = (0..6).map(|_| SetList::new()).collect();
        Self {
            tables,
            large: FxHashSet::default(),
            used: [[false; 3]; 2],
            nonglobal,
            flushes: 0,
            page_invalidations: 0,
            generation: 0,
            journal: [Dropped::All; JOURNAL],
        }
    }

    #[inline(always)]
    fn index(lin: u64) -> usize {
        ((lin >> 12) as usize) & (TLB_SIZE - 1)
    }

    fn table(&self, kind: Access, user: bool) -> &Table {
        &self.tables[user as usize * 3 + kind as usize]
    }

    /// The way holding `lin`'s page in `table`, if either does.
    #[inline(always)]
    fn find(table: &Table, lin: u64) -> Option<usize> {
        let (i, page) = (Self::index(lin), lin & !0xfff);
        [i, TLB_SIZE + i].into_iter().find(|&at| table.maps(at, page))
    }

    /// The host address for `lin` if the page is cached for this access.
    #[inline(always)]
    pub fn lookup(&self, lin: u64, kind: Access, user: bool) -> Option<u64> {
        let table = self.table(kind, user);
        Self::find(table, lin).map(|at| lin.wrapping_add(table.addends[at]))
    }

    /// Host address of the table translated code probes for `kind` at this privilege.
    pub fn table_addr(&self, kind: Access, user: bool) -> u64 {
        self.table(kind, user) as *const Table as u64
    }

    /// The entry for `lin`, if cached (for its physical page).
    #[inline]
    pub fn entry(&self, lin: u64, kind: Access, user: bool) -> Option<TlbEntry> {
        let table = self.table(kind, user);
        Self::find(table, lin).map(|at| table.get(at))
    }

    /// Caches translation `t` of `lin`, whose page is at host address `host_page`.
    pub fn fill(&mut self, lin: u64, kind: Access, user: bool, t: &Translation, host_page: u64) {
        let page = lin & !0xfff;
        if t.page_size > 0x1000 {
            self.large.insert((lin & !(t.page_size - 1), t.page_size));
        }
        self.used[user as usize][kind as usize] = true;
        let t_index = user as usize * 3 + kind as usize;
        let table = &mut self.tables[t_index];
        let i = Self::index(lin);
        if !t.global {
            self.nonglobal[t_index].insert(i);
        }
        // The displaced entry goes to the second way (over this page's
        // entry there, if any: a page is in one way at most).
        if !table.maps(i, page) {
            table.set(TLB_SIZE + i, table.get(i));
        }
        table.set(i, TlbEntry { tag: page, addend: host_page.wrapping_sub(page), phys_page: t.phys & !0xfff, global: t.global });
    }

    /// A new generation, which dropped `what`.
    fn record(&mut self, what: Dropped) {
        self.generation += 1;
        self.journal[self.generation as usize % JOURNAL] = what;
    }

    /// What the generation changes after `since` up to the current one
    /// dropped, oldest first; `None` if the journal no longer reaches back.
    pub fn dropped_since(&self, since: u64) -> Option<impl Iterator<Item = Dropped> + '_> {
        let behind = self.generation.checked_sub(since)?;
        (behind as usize <= JOURNAL).then(|| (since + 1..=self.generation).map(|g| self.journal[g as usize % JOURNAL]))
    }

    /// Drops everything (CR0/CR4 paging bits, EFER, CR3 with `keep_global` false).
    pub fn flush_all(&mut self) {
        self.flush(false);
    }

    /// Drops every non-global entry, or every entry if `keep_global` is false.
    pub fn flush(&mut self, keep_global: bool) {
        self.flushes += 1;
        self.record(if keep_global { Dropped::NonGlobal } else { Dropped::All });
        if keep_global {
            // Non-global entries are only ever in the sets listed.
            for (table, sets) in self.tables.iter_mut().zip(self.nonglobal.iter_mut()) {
                for i in sets.drain() {
                    for at in [i, TLB_SIZE + i] {
                        if table.phys_pages[at] != u64::MAX && !table.globals[at] {
                            table.clear(at);
                        }
                    }
                }
            }
        } else {
            self.retain(|_| false);
            self.large.clear();
            self.nonglobal.iter_mut().for_each(|sets| sets.drain().for_each(drop));
        }
    }

    /// Empties every entry of the tables in use that `keep` rejects; a
    /// table left with nothing is marked unused (flushes skip it).
    fn retain(&mut self, keep: impl Fn(&TlbEntry) -> bool) {
        for (table, used) in self.tables.iter_mut().zip(self.used.iter_mut().flatten()).filter(|(_, used)| **used) {
            let mut kept = false;
            for at in 0..TABLE_ENTRIES {
                // Empty already (most entries of a table, between flushes).
                if table.phys_pages[at] == u64::MAX {
                    continue;
                }
                if keep(&table.get(at)) {
                    kept = true;
                } else {
                    table.clear(at);
                }
            }
            *used = kept;
        }
    }

    /// `invlpg`: drops the mapping of the page holding `lin`, global or not.
    pub fn invalidate_page(&mut self, lin: u64) {
        self.page_invalidations += 1;
        let large = LARGE_SIZES.iter().map(|&size| (lin & !(size - 1), size)).find(|p| self.large.contains(p));
        if let Some((base, size)) = large {
            self.large.remove(&(base, size));
            self.record(Dropped::Large(base, size));
            self.retain(|e| e.tag & !(size - 1) != base);
            return;
        }
        let page = lin & !0xfff;
        self.record(Dropped::Page(page));
        let i = Self::index(lin);
        for table in self.tables.iter_mut() {
            for at in [i, TLB_SIZE + i] {
                if table.maps(at, page) {
                    table.clear(at);
                }
            }
        }
    }

    /// Drops every write entry for a physical page that now holds code.
    pub fn protect_code_page(&mut self, phys_page: u64) {
        for user in [false, true] {
            let table = &mut self.tables[user as usize * 3 + Access::Write as usize];
            for at in 0..TABLE_ENTRIES {
                if table.phys_pages[at] == phys_page {
                    table.clear(at);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tlb_entry_layout_is_the_translator_abi() {
        use btvmm_translator::abi::tlb;
        assert_eq!(std::mem::offset_of!(Table, tags), 0);
        assert_eq!(std::mem::offset_of!(Table, addends), tlb::OFF_ADDEND);
        assert!(TLB_SIZE.is_power_of_two());
        assert_eq!(tlb::OFF_WAY2, TLB_SIZE * 8);
        // What a probe reads for a filled entry: the complemented page at
        // its index, its addend OFF_ADDEND further.
        let mut t = Tlb::new();
        let lin = 0x1234_5000u64;
        t.fill(lin, Access::Write, true, &Translation { phys: 0x8000, global: false, page_size: 0x1000 }, 0x7f00_0000_8000);
        let base = t.table_addr(Access::Write, true) as *const u64;
        let i = ((lin >> 12) as usize) & (TLB_SIZE - 1);
        // SAFETY: both reads fall inside the table `base` points to.
        let (tag, addend) = unsafe { (*base.add(i), *base.add(i + tlb::OFF_ADDEND / 8)) };
        assert_eq!((tag, addend), (!lin, 0x7f00_0000_8000 - lin));
    }

    #[test]
    fn an_empty_entry_matches_nothing() {
        let t = Tlb::new();
        let pages = (0..3 * TLB_SIZE as u64).map(|k| k << 12);
        for page in pages.clone().chain(pages.map(|p| (1 << 63) | p)) {
            for kind in [Access::Read, Access::Write, Access::Execute] {
                assert_eq!(t.lookup(page | 0x123, kind, false), None, "page {page:#x}");
                assert_eq!(t.lookup(page, kind, true), None);
            }
        }
    }

    #[test]
    fn tlb_fill_then_lookup_adds_offset() {
        let mut t = Tlb::new();
        t.fill(0x1234_5000, Access::Read, false, &Translation { phys: 0x8000, global: false, page_size: 0x1000 }, 0x7f00_0000_8000);
        assert_eq!(t.lookup(0x1234_5abc, Access::Read, false), Some(0x7f00_0000_8abc));
        assert_eq!(t.lookup(0x1234_5abc, Access::Write, false), None);
        assert_eq!(t.lookup(0x1234_5abc, Access::Read, true), None);
    }

    #[test]
    fn tlb_flush_keeping_global_keeps_only_global() {
        let mut t = Tlb::new();
        t.fill(0x1000, Access::Read, false, &Translation { phys: 0x1000, global: true, page_size: 0x1000 }, 0x9000);
        t.fill(0x2000, Access::Read, false, &Translation { phys: 0x2000, global: false, page_size: 0x1000 }, 0xa000);
        t.flush(true);
        assert!(t.lookup(0x1000, Access::Read, false).is_some());
        assert!(t.lookup(0x2000, Access::Read, false).is_none());
        t.invalidate_page(0x1000);
        assert!(t.lookup(0x1000, Access::Read, false).is_none());
    }

    /// A CR3 write's flush looks only at the sets non-global entries went
    /// into: across many sets, both ways, every table, and after a flush
    /// whose sets were emptied, it leaves exactly the global entries.
    #[test]
    fn a_flush_of_non_global_entries_finds_them_all() {
        let mut t = Tlb::new();
        let pages: Vec<u64> = (0..3000u64).map(|k| k.wrapping_mul(0x9e37_79b9) & 0xffff_f000).collect();
        for round in 0..3 {
            for (k, &page) in pages.iter().enumerate() {
                let global = (k + round) % 3 == 0;
                let kind = [Access::Read, Access::Write, Access::Execute][k % 3];
                t.fill(page, kind, k % 2 == 0, &Translation { phys: page, global, page_size: 0x1000 }, 0x1_0000_0000 + page);
            }
            t.flush(true);
            for table in t.tables.iter() {
                for at in 0..TABLE_ENTRIES {
                    assert!(table.phys_pages[at] == u64::MAX || table.globals[at], "round {round}: a non-global entry at {at}");
                }
            }
            let kept = t.tables.iter().map(|table| table.globals.iter().filter(|&&g| g).count()).sum::<usize>();
            assert!(kept > 0, "round {round}: global entries stay");
        }
    }

    #[test]
    fn invlpg_drops_every_piece_of_a_large_page_and_only_one_small_page() {
        let mut t = Tlb::new();
        let small = |phys| Translation { phys, global: false, page_size: 0x1000 };
        let large = Translation { phys: 0x20_0000, global: false, page_size: 0x20_0000 };
        // Two 4 KiB pieces of the 2 MiB page at 0xffff_8000_0020_0000.
        t.fill(0xffff_8000_0020_1000, Access::Read, false, &large, 0x9000);
        t.fill(0xffff_8000_0023_4000, Access::Write, false, &large, 0xa000);
        t.fill(0x40_1000, Access::Read, false, &small(0x5000), 0xb000);
        t.fill(0x40_2000, Access::Read, false, &small(0x6000), 0xc000);
        // Outside the large region: one page goes, the rest stays.
        t.invalidate_page(0x40_1234);
        assert!(t.lookup(0x40_1000, Access::Read, false).is_none());
        assert!(t.lookup(0x40_2000, Access::Read, false).is_some());
        assert!(t.lookup(0xffff_8000_0020_1000, Access::Read, false).is_some());
        // Anywhere in the large page: every piece of it goes.
        t.invalidate_page(0xffff_8000_003f_f000);
        assert!(t.lookup(0xffff_8000_0020_1000, Access::Read, false).is_none());
        assert!(t.lookup(0xffff_8000_0023_4000, Access::Write, false).is_none());
        // A large page far away is another page: an invlpg in it (of a
        // 1 GiB page here) drops its pieces and nothing of the 2 MiB one.
        t.fill(0x4000_0000, Access::Read, false, &Translation { page_size: 0x4000_0000, ..large }, 0xd000);
        t.fill(0xffff_8000_0020_1000, Access::Read, false, &large, 0x9000);
        t.invalidate_page(0x4000_0000 + 0x3fff_f000);
        assert!(t.lookup(0x4000_0000, Access::Read, false).is_none());
        assert!(t.lookup(0xffff_8000_0020_1000, Access::Read, false).is_some());
    }

    /// An invlpg between cached large pages (a vmalloc page of a 64-bit
    /// kernel, between its direct map and its text) drops that one page:
    /// the large pages' pieces stay. (It flushed everything: a region
    /// covering all large pages spans the kernel's half.)
    #[test]
    fn invlpg_between_large_pages_keeps_them() {
        let mut t = Tlb::new();
        let large = |phys| Translation { phys, global: true, page_size: 0x20_0000 };
        let direct_map = 0xffff_8880_0020_0000u64;
        let text = 0xffff_ffff_8100_0000u64;
        let vmalloc = 0xffff_c900_0001_0000u64;
        t.fill(direct_map, Access::Read, false, &large(0x20_0000), 0x9000);
        t.fill(text, Access::Execute, false, &large(0x100_0000), 0xa000);
        t.fill(vmalloc, Access::Write, false, &Translation { phys: 0x5000, global: true, page_size: 0x1000 }, 0xb000);
        t.invalidate_page(vmalloc);
        assert!(t.lookup(vmalloc, Access::Write, false).is_none());
        assert!(t.lookup(direct_map, Access::Read, false).is_some());
        assert!(t.lookup(text, Access::Execute, false).is_some());
        assert_eq!(t.flushes, 0);
    }

    /// Pages that share an index live side by side; a third displaces the
    /// older; invlpg finds a page in either way; a page is never in both.
    #[test]
    fn two_pages_with_one_index_are_both_cached() {
        let mut t = Tlb::new();
        let at = |phys| Translation { phys, global: false, page_size: 0x1000 };
        let stride = (TLB_SIZE as u64) << 12;
        let (a, b, c) = (0x40_0000u64, 0x40_0000 + stride, 0x40_0000 + 2 * stride);
        t.fill(a, Access::Read, false, &at(0x1000), 0x9000);
        t.fill(b, Access::Read, false, &at(0x2000), 0xa000);
        assert_eq!(t.lookup(a + 8, Access::Read, false), Some(0x9008));
        assert_eq!(t.lookup(b + 8, Access::Read, false), Some(0xa008));
        t.fill(a, Access::Read, false, &at(0x1000), 0xb000);
        assert_eq!(t.lookup(a, Access::Read, false), Some(0xb000), "the refill wins");
        assert_eq!(t.lookup(b, Access::Read, false), Some(0xa000));
        t.fill(c, Access::Read, false, &at(0x3000), 0xc000);
        assert_eq!(t.lookup(b, Access::Read, false), None, "the older one goes");
        assert_eq!(t.lookup(a, Access::Read, false), Some(0xb000));
        t.invalidate_page(a);
        assert_eq!(t.lookup(a, Access::Read, false), None);
        assert_eq!(t.lookup(c, Access::Read, false), Some(0xc000));
    }

    #[test]
    fn tlb_protect_code_page_drops_write_entries_only() {
        let mut t = Tlb::new();
        t.fill(0x5000, Access::Write, false, &Translation { phys: 0x3000, global: false, page_size: 0x1000 }, 0xb000);
        t.fill(0x5000, Access::Read, false, &Translation { phys: 0x3000, global: false, page_size: 0x1000 }, 0xb000);
        t.protect_code_page(0x3000);
        assert!(t.lookup(0x5000, Access::Write, false).is_none());
        assert!(t.lookup(0x5000, Access::Read, false).is_some());
    }
}
