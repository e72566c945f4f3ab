//! The binary-translation engine: the code cache, the dispatcher's side of
//! the CCF protocol, and entry into compiled code (DESIGN.md, "Execution
//! engines").
//!
//! The interpreter's run loop stays the one loop: it polls time, delivers
//! interrupts and sleeps in `hlt` for both engines. Where the interpreter
//! would run a decoded block, the translator's engine looks up (or compiles)
//! the CCF for (physical address, RIP, mode), loads the guest registers into
//! the host's, and runs it until it exits. An exit that names an
//! instruction (a system instruction, a soft-TLB miss, a division) runs that
//! one instruction in the interpreter, whose functions are the one shared
//! implementation of everything sensitive.

use rustc_hash::{FxBuildHasher, FxHashMap};

use btvmm_translator::abi::{ibtc_index, ibtc_table, IBTC_ENTRIES, IBTC_WAYS, rflags, seg, tlb, BtBlock, ExitReason, IBTC_EMPTY};
use btvmm_translator::templates;
use btvmm_translator::translate::{self, Ccf, ExitSite, Mode, Outcome, MAX_TU_INSNS};

use crate::code_mem::{CodeArena, CodeMemError, ARENA_BUDGET};

mod fault;
pub mod kick;
use kick::{KickGuard, KickMap, Kicker};
use crate::cpu::CpuMode;
use crate::interp::Vcpu;
use crate::mmu::tlb::Dropped;
use crate::mmu::Access;

/// Transfers through the IBTC a CCF may make before the dispatcher looks at
/// the clock and the interrupt lines again (chained jumps are not counted:
/// a kick unchains them, see `kick`).
const CHAIN_BUDGET: u64 = 4096;

/// The code cache hands out slots of these sizes; a CCF takes the smallest
/// that holds it (one larger than the last is not cached: interpreted).
const SLOT_CLASSES: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];

/// Code memory is mapped in pieces of this size.
const CACHE_CHUNK: usize = 4 << 20;

fn slot_class(len: usize) -> Option<usize> {
    SLOT_CLASSES.iter().position(|&c| len <= c)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    phys: u64,
    rip: u64,
    /// CS base (outside 64-bit mode): with the RIP, the linear address.
    cs_base: u64,
    mode: Mode,
}

#[derive(Clone, Copy)]
enum Slot {
    /// A published CCF, by TU id.
    Tu(u32),
    /// The first instruction here always needs the runtime.
    Interpret,
}

/// A published CCF and its links.
struct Tu {
    key: Key,
    /// Where its code starts in the cache (a slot of class `class`), and
    /// its entry point.
    base: *const u8,
    class: usize,
    entry: *const u8,
    exits: Vec<ExitSite>,
    /// The linear page of its first instruction: jumps within it are chained.
    lin_page: u64,
    /// The second page's linear and physical address, if the TU spans two:
    /// checked at every lookup; jumps chained into the TU are unchained
    /// when any mapping changes, and its IBTC entries are dropped with the
    /// mapping of either of its pages.
    page2: Option<(u64, u64)>,
    /// Its code's length, and where each guest instruction's code starts
    /// (offset from `base`, guest RIP), to name the instruction of a host
    /// fault.
    len: usize,
    rip_map: Box<[(u32, u64)]>,
    /// Exit stubs (TU id, stub index) patched to jump here.
    incoming: Vec<(u32, u8)>,
    /// Whether jumps from other linear pages are among them (and the TU is
    /// listed in `Bt::cross`).
    cross_in: bool,
    /// TUs this one's stubs jump to.
    outgoing: Vec<u32>,
}

/// Counters for `--stats`.
#[derive(Clone, Debug, Default)]
pub struct BtStats {
    /// TUs compiled, by code size (16, 32, 64 bits).
    pub tus: [u64; 3],
    pub ident: u64,
    pub mem: u64,
    pub control: u64,
    pub sensitive: u64,
    /// Host code bytes compiled.
    pub code_bytes: u64,
    /// CCFs entered from the dispatcher.
    pub entries: u64,
    /// CCF exits to the dispatcher by reason, in `ExitReason` order: next,
    /// interpret, indirect, fault, host fault.
    pub exits: [u64; 5],
    pub lookups_hit: u64,
    pub lookups_miss: u64,
    /// Of the hits, those the dispatcher found in the IBTC.
    pub ibtc_hits: u64,
    /// TUs evicted, least recently used first, to make room.
    pub evictions: u64,
    /// Whole-cache flushes (eviction could not free a slot of the size needed).
    pub flushes: u64,
    /// TUs dropped because their guest page was written.
    pub invalidated: u64,
    /// Instructions run in the shared Rust semantics on a CCF's behalf, by mnemonic.
    pub callouts: FxHashMap<iced_x86::Mnemonic, u64>,
    /// Exit stubs patched into direct jumps, and undone again.
    pub chained: u64,
    pub unchained: u64,
    /// Kick signals sent to the vCPU thread, and those that landed in a CCF.
    pub kicks: u64,
    pub kicks_landed: u64,
}

/// The translator's engine state, owned by a [`Vcpu`].
pub struct Bt {
    block: Box<BtBlock>,
    arena: CodeArena,
    /// Bytes of slots the cache may carve from the arena.
    budget: usize,
    /// Bytes carved so far, and the free slots of each class.
    carved: usize,
    free_slots: [Vec<*const u8>; SLOT_CLASSES.len()],
    /// TU ids by recency of use from the dispatcher.
    lru: lru::LruCache<u32, (), FxBuildHasher>,
    entry: extern "sysv64" fn(),
    exit: u64,
    /// The fault-exit trampolines (see `fault`), and the code ranges
    /// registered with the fault handler.
    fault_exits: fault::FaultExits,
    /// The SSE-state load routine and the bare `ret` that stands for it
    /// once the state is loaded (`BtBlock::fpu_enter`).
    fpu_load: u64,
    fpu_ready: u64,
    fault_ranges: Vec<(usize, usize)>,
    /// Where each TU's chainable stubs are, for the kick handler, and the
    /// kicker of the running vCPU (while `Vcpu::run` runs).
    kick: Box<KickMap>,
    kicking: Option<(Kicker, KickGuard)>,
    map: FxHashMap<Key, Slot>,
    by_page: FxHashMap<u64, Vec<Key>>,
    /// TUs by id; ids of removed TUs are reused.
    tus: Vec<Option<Tu>>,
    free_ids: Vec<u32>,
    /// The exit the last CCF left through, if it may be chained to the
    /// next TU: (TU id, stub index).
    pending_chain: Option<(u32, u8)>,
    /// TUs spanning two pages that chained jumps lead into, and the TLB
    /// generation under which their second page was last checked: any
    /// mapping change unchains them (the dispatcher's lookup checks again).
    page2_chained: Vec<u32>,
    page2_generation: u64,
    /// TUs that jumps from other linear pages are chained into.
    cross: CrossChains,
    /// What the runtime knows of each of the block's IBTC tables
    /// (`BtBlock::ibtc`, indexed by `ibtc_table`).
    ibtc: [IbtcBook; 2],
    pub stats: BtStats,
    /// `/tmp/perf-PID.map`, where every TU's code is named for `perf`
    /// (when the environment sets `BTVMM_PERF_MAP`).
    perf_map: Option<std::fs::File>,
}

/// The TUs that jumps from other linear pages are chained into. Such a
/// jump holds as long as the mapping of its target's page does, as an IBTC
/// entry does: it is unchained when that mapping may change (a full flush,
/// a CR3 write for a page not mapped global, an `invlpg` of the page).
/// A TU is listed while it has such chains (`Tu::cross_in`), and no longer
/// once they are unchained or it is removed. Chains into TUs of code that
/// runs at CPL 1 to 3 (whose modes agree) are made under one of those
/// privileges: all of them go when the code runs under another.
#[derive(Default)]
struct CrossChains {
    /// By the target's linear page.
    by_page: FxHashMap<u64, Vec<u32>>,
    /// Those whose page is not mapped global.
    nonglobal: rustc_hash::FxHashSet<u32>,
    /// The TLB generation they are up to date with.
    generation: u64,
    /// The last privilege other than 0 that code ran at when they were
    /// brought up to date.
    ring: u8,
}

/// The runtime's record of one IBTC table of the block.
struct IbtcBook {
    /// What the table's entries were looked up under: mode, CS base, CPL.
    /// Any change empties it.
    context: (Mode, u64, u8),
    /// The TLB generation the table is up to date with. A table whose
    /// privilege is not running falls behind, and catches up (or is
    /// emptied) when it runs again.
    generation: u64,
    /// Whether each entry's code is mapped global (it survives a CR3 write,
    /// as the TLB entries do): its page, or both pages of a TU that spans
    /// two.
    global: Box<[bool; IBTC_ENTRIES]>,
    /// The linear pages each entry's code lies in: the first and the last
    /// (the same page but for a TU that spans two).
    code_pages: Box<[[u64; 2]; IBTC_ENTRIES]>,
    /// The linear code pages of the entries filled since the table was last
    /// emptied (a superset of those it holds), and whether any of them is
    /// not global: what an `invlpg` or a CR3 write may have to drop.
    pages: rustc_hash::FxHashSet<u64>,
    nonglobal: bool,
    /// The TU id of each entry the dispatcher filled, so that its own
    /// lookups through the IBTC can chain the jump that exited.
    ids: Box<[u32; IBTC_ENTRIES]>,
}

impl IbtcBook {
    fn new() -> Self {
        IbtcBook {
            context: (Mode { bits: 0, seg_base_mask: 0, seg_usable_mask: 0, stack_bits: 0, cpl0: false, sse: false, avx: false, fp_masked: false, x87: false, tlb_tables: None }, 0, 0),
            generation: 0,
            global: Box::new([false; IBTC_ENTRIES]),
            code_pages: Box::new([[0; 2]; IBTC_ENTRIES]),
            pages: Default::default(),
            nonglobal: false,
            ids: Box::new([u32::MAX; IBTC_ENTRIES]),
        }
    }
}

/// The engine cannot start (not a guest event).
#[derive(Debug, thiserror::Error)]
pub enum BtError {
    #[error(transparent)]
    CodeMemory(#[from] CodeMemError),
    #[error("cannot set the host GS base: {0}")]
    GsBase(std::io::Error),
    #[error("cannot start the kicker: {0}")]
    Kick(std::io::Error),
}

impl Bt {
    /// An engine with a code cache of `cache_bytes`.
    pub fn new(cache_bytes: usize) -> Result<Self, BtError> {
        let mut arena = CodeArena::with_chunks(usize::MAX, CACHE_CHUNK);
        let Published { entry, exit, fault_exits, fpu_load, fpu_ready } = publish_trampolines(&mut arena)?;
        let mut bt = Self {
            block: Box::default(),
            arena,
            budget: cache_bytes.max(64 * 1024),
            carved: 0,
            free_slots: Default::default(),
            lru: lru::LruCache::unbounded_with_hasher(FxBuildHasher),
            entry,
            exit,
            fault_exits,
            fpu_load,
            fpu_ready,
            fault_ranges: Vec::new(),
            kick: Box::new(KickMap::new(std::ptr::null_mut())),
            kicking: None,
            map: FxHashMap::default(),
            by_page: FxHashMap::default(),
            tus: Vec::new(),
            free_ids: Vec::new(),
            pending_chain: None,
            page2_chained: Vec::new(),
            page2_generation: 0,
            cross: CrossChains::default(),
            ibtc: [IbtcBook::new(), IbtcBook::new()],
            stats: BtStats::default(),
            perf_map: std::env::var_os("BTVMM_PERF_MAP")
                .and_then(|_| std::fs::File::create(format!("/tmp/perf-{}.map", std::process::id())).ok()),
        };
        // The block is boxed: the pointer stays good as `bt` moves.
        bt.kick = Box::new(KickMap::new(&mut bt.block.budget));
        bt.sync_fault_ranges();
        Ok(bt)
    }

    /// Starts kicking this thread (for as long as the vCPU runs on it):
    /// installs the kick handler's map and starts the kicker thread.
    pub(crate) fn start_kicks(&mut self) -> Result<(), BtError> {
        let guard = self.kick.install().map_err(BtError::Kick)?;
        let kicker = Kicker::start().map_err(BtError::Kick)?;
        self.kicking = Some((kicker, guard));
        Ok(())
    }

    /// Stops the kicker and counts what it did.
    pub(crate) fn stop_kicks(&mut self) {
        if let Some((kicker, guard)) = self.kicking.take() {
            self.stats.kicks += kicker.sent();
            drop(kicker);
            drop(guard);
        }
        self.stats.kicks_landed = self.kick.landed.load(std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a kick came since the last look (the dispatcher then polls).
    #[inline]
    pub(crate) fn kicked(&self) -> bool {
        self.kicking.as_ref().is_some_and(|(k, _)| k.take())
    }

    /// When the kicker must kick next (host time).
    pub(crate) fn kick_at(&self, at: Option<std::time::Instant>) {
        if let Some((k, _)) = &self.kicking {
            k.set_deadline(at);
        }
    }

    /// Tells the fault handler where compiled code lives now.
    fn sync_fault_ranges(&mut self) {
        let ranges = self.arena.ranges();
        if ranges != self.fault_ranges {
            let views = self.arena.views();
            self.kick.sync(&views);
            for &(start, end) in &ranges {
                fault::register(start, end, self.fault_exits);
            }
            self.fault_ranges = ranges;
        }
    }

    /// An engine with the default code-cache size.
    pub fn with_default_cache() -> Result<Self, BtError> {
        Self::new(ARENA_BUDGET)
    }

    /// The guest pages that hold translated code.
    pub fn pages(&self) -> Vec<u64> {
        self.by_page.keys().copied().collect()
    }

    /// Drops every TU with bytes in `phys_page`.
    pub fn invalidate_page(&mut self, phys_page: u64) {
        if let Some(keys) = self.by_page.remove(&phys_page) {
            for k in keys {
                if let Some(slot) = self.map.remove(&k) {
                    self.stats.invalidated += 1;
                    tracing::debug!(target: "cache", rip = format_args!("{:#x}", k.rip), page = format_args!("{phys_page:#x}"), "TU invalidated: its page was written");
                    if let Slot::Tu(id) = slot {
                        self.remove_tu(id);
                    }
                }
            }
        }
    }

    /// Forgets TU `id`: every jump chained into it goes back to exiting,
    /// and its own chains are forgotten by their targets.
    fn remove_tu(&mut self, id: u32) {
        let Some(tu) = self.tus.get_mut(id as usize).and_then(Option::take) else { return };
        self.lru.pop(&id);
        if tu.cross_in {
            self.unlist_cross(id, tu.lin_page);
        }
        // Only the set of its RIP can hold it, in either table.
        let set = ibtc_index(tu.key.rip);
        for e in self.block.ibtc.iter_mut().flat_map(|t| &mut t[set..set + IBTC_WAYS]) {
            if e[1] == tu.entry as u64 {
                *e = [IBTC_EMPTY, 0];
            }
        }
        self.kick.set(tu.base, SLOT_CLASSES[tu.class], &[]);
        self.free_slots[tu.class].push(tu.base);
        if self.pending_chain.is_some_and(|(src, _)| src == id) {
            self.pending_chain = None;
        }
        self.unpatch(&tu.incoming);
        for dst in tu.outgoing {
            if let Some(Some(d)) = self.tus.get_mut(dst as usize) {
                d.incoming.retain(|&(src, _)| src != id);
            }
        }
        self.free_ids.push(id);
    }

    /// Turns the exit stubs `incoming` (TU id, stub index) back into exits.
    fn unpatch(&mut self, incoming: &[(u32, u8)]) {
        for &(src, stub) in incoming {
            if let Some(Some(s)) = self.tus.get(src as usize) {
                let (at, rel) = s.exits[stub as usize].link();
                self.arena.patch(s.base.wrapping_add(at), &rel.to_le_bytes());
                self.stats.unchained += 1;
            }
        }
    }

    /// Unchains every jump into a TU that spans two pages, if any mapping
    /// may have changed since they were chained (TLB generation `generation`).
    fn check_page2_chains(&mut self, generation: u64) {
        if self.page2_generation == generation {
            return;
        }
        self.page2_generation = generation;
        for id in std::mem::take(&mut self.page2_chained) {
            let Some(Some(tu)) = self.tus.get_mut(id as usize) else { continue };
            let incoming = std::mem::take(&mut tu.incoming);
            self.unchain(id, &incoming);
        }
    }

    /// Turns the stubs `edges` (TU id, stub index), taken from TU `id`'s
    /// `incoming`, back into exits, and forgets `id` among their TUs'
    /// `outgoing`.
    fn unchain(&mut self, id: u32, edges: &[(u32, u8)]) {
        self.unpatch(edges);
        for &(src, _) in edges {
            if let Some(Some(s)) = self.tus.get_mut(src as usize) {
                s.outgoing.retain(|&d| d != id);
            }
        }
    }

    /// Unchains the jumps from other linear pages into the TUs whose page's
    /// mapping went since the last look (TLB generations after
    /// `cross.generation`; everything if the journal no longer reaches
    /// back), and all of them if code runs at CPL `cpl`, not 0, other than
    /// the last (a page a jump was chained into at CPL 3 may be closed to
    /// CPL 1, or one chained into at CPL 1 to CPL 3).
    /// Returns whether the privilege changed so (jumps chained into TUs
    /// spanning two pages must go too: `check_page2_chains`).
    fn check_cross_chains(&mut self, tlb: &crate::mmu::tlb::Tlb, cpl: u8) -> bool {
        let ring_changed = cpl != 0 && cpl != self.cross.ring;
        if self.cross.generation == tlb.generation && !ring_changed {
            return false;
        }
        let since = std::mem::replace(&mut self.cross.generation, tlb.generation);
        if cpl != 0 {
            self.cross.ring = cpl;
        }
        if self.cross.by_page.is_empty() {
            return ring_changed;
        }
        let mut gone = Vec::new();
        let mut all = ring_changed;
        match tlb.dropped_since(since).filter(|_| !all) {
            None => all = true,
            Some(dropped) => {
                for d in dropped {
                    match d {
                        Dropped::All => all = true,
                        Dropped::NonGlobal => gone.extend(self.cross.nonglobal.drain()),
                        Dropped::Page(page) => gone.extend(self.cross.by_page.remove(&page).unwrap_or_default()),
                        Dropped::Large(base, size) => self.cross.by_page.retain(|&page, ids| {
                            let inside = page & !(size - 1) == base;
                            if inside {
                                gone.append(ids);
                            }
                            !inside
                        }),
                    }
                    if all {
                        break;
                    }
                }
            }
        }
        if all {
            gone = self.cross.by_page.drain().flat_map(|(_, ids)| ids).collect();
            self.cross.nonglobal.clear();
        }
        for id in gone {
            self.unchain_cross_into(id);
        }
        ring_changed
    }

    /// Takes TU `id` off the lists of `cross`.
    fn unlist_cross(&mut self, id: u32, page: u64) {
        if let Some(ids) = self.cross.by_page.get_mut(&page) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.cross.by_page.remove(&page);
            }
        }
        self.cross.nonglobal.remove(&id);
    }

    /// Unchains the jumps from other linear pages into TU `id`.
    fn unchain_cross_into(&mut self, id: u32) {
        let Some(Some(d)) = self.tus.get_mut(id as usize) else { return };
        if !d.cross_in {
            return;
        }
        d.cross_in = false;
        let page = d.lin_page;
        let incoming = std::mem::take(&mut d.incoming);
        self.unlist_cross(id, page);
        let (cross, same): (Vec<_>, Vec<_>) =
            incoming.into_iter().partition(|&(src, _)| self.tus.get(src as usize).and_then(Option::as_ref).is_some_and(|s| s.lin_page != page));
        if let Some(Some(d)) = self.tus.get_mut(id as usize) {
            d.incoming = same;
        }
        self.unchain(id, &cross);
    }

    /// An id for a new TU.
    fn next_id(&mut self) -> u32 {
        self.free_ids.pop().unwrap_or_else(|| {
            self.tus.push(None);
            (self.tus.len() - 1) as u32
        })
    }

    /// Patches the exit stub the last CCF left through into a jump to TU
    /// `dst`. A jump into another linear page is listed with that page
    /// (whose mapping is global or not: `global`), to be unchained when the
    /// mapping may change (`check_cross_chains`).
    fn chain(&mut self, dst: u32, global: bool) {
        let Some((src, stub)) = self.pending_chain.take() else { return };
        let (Some(Some(s)), Some(Some(d))) = (self.tus.get(src as usize), self.tus.get(dst as usize)) else { return };
        if s.key.mode != d.key.mode || s.key.cs_base != d.key.cs_base {
            return;
        }
        let cross = s.lin_page != d.lin_page;
        let Some(exit) = s.exits.get(stub as usize) else { return };
        if exit.reason != ExitReason::Next || exit.rip != d.key.rip {
            return;
        }
        // The displacement of the stub's jump, or of the branch to it.
        let at = s.base.wrapping_add(exit.link().0);
        // A loop's back edge goes past its own TU's entry (`ExitSite::chain_to`).
        let to = match exit.chain_to {
            Some(off) if src == dst => s.base.wrapping_add(off),
            _ => d.entry,
        };
        let Ok(rel) = i32::try_from((to as i64).wrapping_sub(at as i64 + 4)) else { return };
        if !self.arena.patch(at, &rel.to_le_bytes()) {
            return;
        }
        self.stats.chained += 1;
        // A kick unchains stubs behind the books' back: chaining one again
        // finds it listed already.
        if let Some(Some(d)) = self.tus.get_mut(dst as usize) {
            if d.incoming.contains(&(src, stub)) {
                return;
            }
            if d.page2.is_some() && d.incoming.is_empty() {
                self.page2_chained.push(dst);
            }
            if cross {
                if !d.cross_in {
                    d.cross_in = true;
                    self.cross.by_page.entry(d.lin_page).or_default().push(dst);
                }
                // (A TU listed under a global mapping may be chained into
                // again under a non-global one.)
                if !global {
                    self.cross.nonglobal.insert(dst);
                }
            }
            d.incoming.push((src, stub));
        }
        if let Some(Some(s)) = self.tus.get_mut(src as usize) {
            s.outgoing.push(dst);
        }
    }

    /// A slot for `len` bytes of code: a free one, a newly carved one while
    /// the budget lasts, or one freed by evicting the least recently used
    /// TUs (unchaining every jump into them). `None` if `len` is too large.
    fn alloc_slot(&mut self, len: usize) -> Result<Option<(*const u8, usize)>, BtError> {
        let Some(class) = slot_class(len) else { return Ok(None) };
        loop {
            if let Some(p) = self.free_slots[class].pop() {
                return Ok(Some((p, class)));
            }
            let size = SLOT_CLASSES[class];
            if self.carved + size <= self.budget {
                let p = self.arena.publish(&vec![0xcc; size])?;
                self.carved += size;
                self.sync_fault_ranges();
                return Ok(Some((p, class)));
            }
            match self.lru.pop_lru() {
                Some((victim, ())) => self.evict(victim),
                // Everything is evicted and the free slots are all of other
                // sizes: start over with the budget.
                None => self.flush()?,
            }
        }
    }

    /// Enters `rip`'s TU (`id`, entered at `entry`, its code in linear
    /// `pages`; `rip` as its mode's `Mode::ibtc_key`, whose tag the set's
    /// index ignores) in IBTC table `t`: in the first way of its set, the
    /// entries there moving a way down and the last one out (as the soft
    /// TLB fills).
    fn fill_ibtc(&mut self, t: usize, rip: u64, entry: *const u8, id: u32, pages: [u64; 2], global: bool) {
        let set = ibtc_index(rip);
        let (table, book) = (&mut self.block.ibtc[t], &mut self.ibtc[t]);
        if table[set][0] != rip {
            for to in (set + 1..set + IBTC_WAYS).rev() {
                table[to] = table[to - 1];
                book.ids[to] = book.ids[to - 1];
                book.global[to] = book.global[to - 1];
                book.code_pages[to] = book.code_pages[to - 1];
            }
        }
        table[set] = [rip, entry as u64];
        book.ids[set] = id;
        book.global[set] = global;
        book.code_pages[set] = pages;
        book.nonglobal |= !global;
        book.pages.extend(pages);
    }

    /// Empties IBTC table `t`.
    fn clear_ibtc(&mut self, t: usize) {
        self.block.ibtc[t].fill([IBTC_EMPTY, 0]);
        self.ibtc[t].pages.clear();
        self.ibtc[t].nonglobal = false;
    }

    /// Empties the entries of IBTC table `t` for which `drop(code pages,
    /// global)` holds.
    fn drop_ibtc_where(&mut self, t: usize, drop: impl Fn([u64; 2], bool) -> bool) {
        let book = &self.ibtc[t];
        for ((e, &global), &pages) in self.block.ibtc[t].iter_mut().zip(book.global.iter()).zip(book.code_pages.iter()) {
            if e[0] != IBTC_EMPTY && drop(pages, global) {
                *e = [IBTC_EMPTY, 0];
            }
        }
    }

    /// Evicts TU `id` from the cache.
    fn evict(&mut self, id: u32) {
        if let Some(Some(tu)) = self.tus.get(id as usize) {
            let key = tu.key;
            tracing::debug!(target: "cache", rip = format_args!("{:#x}", key.rip), "TU evicted");
            self.map.remove(&key);
            self.stats.evictions += 1;
        }
        self.remove_tu(id);
    }

    /// Drops every TU and all compiled code, keeping the trampolines.
    fn flush(&mut self) -> Result<(), BtError> {
        self.stats.flushes += 1;
        tracing::debug!(target: "cache", bytes = self.arena.used(), "code cache full: flushed");
        self.map.clear();
        self.by_page.clear();
        self.tus.clear();
        self.free_ids.clear();
        self.pending_chain = None;
        self.page2_chained.clear();
        self.cross = CrossChains { generation: self.cross.generation, ..Default::default() };
        self.lru.clear();
        self.clear_ibtc(0);
        self.clear_ibtc(1);
        self.free_slots = Default::default();
        self.carved = 0;
        self.arena.clear();
        // New chunks may be mapped where old ones were: forget every stub.
        self.kick.sync(&[]);
        let p = publish_trampolines(&mut self.arena)?;
        (self.entry, self.exit, self.fault_exits, self.fpu_load, self.fpu_ready) =
            (p.entry, p.exit, p.fault_exits, p.fpu_load, p.fpu_ready);
        for &(start, end) in &self.fault_ranges {
            fault::unregister(start, end);
        }
        self.fault_ranges.clear();
        self.sync_fault_ranges();
        Ok(())
    }

    /// Names a host fault in compiled code (signal, host address): the
    /// signal, the TU and the guest instruction whose code it hit. Returns
    /// the description and that instruction's guest RIP, if found.
    fn describe_host_fault(&self, fault: Option<(libc::c_int, usize)>) -> (String, Option<u64>) {
        let Some((signo, pc)) = fault else {
            return ("a host fault in translated code, not recorded".into(), None);
        };
        let name = match signo {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGBUS => "SIGBUS",
            libc::SIGILL => "SIGILL",
            libc::SIGFPE => "SIGFPE",
            _ => "a signal",
        };
        let tu = self.tus.iter().flatten().find(|t| (t.base as usize..t.base as usize + t.len).contains(&pc));
        let Some(tu) = tu else {
            return (format!("host {name} at {pc:#x}, in the code cache but in no TU (a trampoline)"), None);
        };
        let off = (pc - tu.base as usize) as u32;
        let rip = tu.rip_map.iter().take_while(|(o, _)| *o <= off).last().map(|&(_, rip)| rip);
        let at = rip.map_or_else(|| "its entry".to_string(), |r| format!("guest RIP {r:#x}"));
        let what = format!(
            "host {name} in the CCF of the {}-bit TU at guest RIP {:#x}, host offset {off:#x}, in the code of {at}; the guest registers are as that code left them",
            tu.key.mode.bits, tu.key.rip
        );
        (what, rip)
    }

    /// Sets this thread's host GS base to the vCPU block. Rust and glibc on
    /// x86-64 Linux never use GS, so it is ours for as long as we want it.
    pub(crate) fn claim_gs(&mut self) -> Result<(), BtError> {
        const ARCH_SET_GS: libc::c_long = 0x1001;
        let block: *mut BtBlock = &mut *self.block;
        // SAFETY: arch_prctl(ARCH_SET_GS) only changes this thread's GS base;
        // nothing in this process addresses memory through GS except CCFs,
        // which expect exactly this block, boxed and never moved.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, block as u64) };
        if r != 0 {
            return Err(BtError::GsBase(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Bt {
    /// The fault handler forgets this engine's code before its chunks go:
    /// another engine's code may be mapped there next.
    fn drop(&mut self) {
        for &(start, end) in &self.fault_ranges {
            fault::unregister(start, end);
        }
    }
}

/// Publishes the entry, exit and fault-exit trampolines into `arena`.
fn publish_trampolines(arena: &mut CodeArena) -> Result<Published, BtError> {
    let t = templates::trampolines();
    let base = arena.publish(&t.code)?;
    // SAFETY: `t.entry` is the offset of the entry trampoline within the
    // code just published, which follows the SysV ABI for a function of no
    // arguments (it saves and restores every callee-saved register).
    let entry: extern "sysv64" fn() = unsafe { std::mem::transmute(base.add(t.entry)) };
    let at = |off: usize| base as u64 + off as u64;
    let fault_exits = fault::FaultExits { guest: at(t.fault) as usize, host: at(t.host_fault) as usize };
    Ok(Published { entry, exit: at(t.exit), fault_exits, fpu_load: at(t.fpu_load), fpu_ready: at(t.fpu_ready) })
}

/// Where the published trampolines are (see `templates::Trampolines`).
struct Published {
    entry: extern "sysv64" fn(),
    exit: u64,
    fault_exits: fault::FaultExits,
    fpu_load: u64,
    fpu_ready: u64,
}

/// The translator's view of the current mode, or `None` where the
/// interpreter runs the code (16-bit code, real and virtual-8086 mode).
fn bt_mode(v: &Vcpu) -> Option<Mode> {
    use crate::cpu::{cr0, cr4};
    let c = &v.cpu;
    let sse = c.cr4 & cr4::OSFXSR != 0 && c.cr0 & (cr0::EM | cr0::TS) == 0;
    let ymm = crate::simd::XCR0_SSE | crate::simd::XCR0_AVX;
    let avx = sse && c.cr4 & cr4::OSXSAVE != 0 && c.xcr0 & ymm == ymm;
    let fp_masked = sse && v.fpu.simd_exceptions_masked();
    let x87 = c.cr0 & (cr0::EM | cr0::TS) == 0 && v.fpu.x87_exceptions_masked();
    match c.mode {
        CpuMode::Long => {
            let tlb_tables = v.bt.as_ref().and_then(|bt| {
                let user = v.user();
                let block = &*bt.block as *const BtBlock as u64;
                // The displacements emitted reach up to the second way's
                // addends: all of them must fit.
                let reach = (btvmm_translator::abi::tlb::OFF_ADDEND + btvmm_translator::abi::tlb::OFF_WAY2) as i64;
                let at = |kind| {
                    let off = v.tlb.table_addr(kind, user).wrapping_sub(block) as i64;
                    i32::try_from(off + reach).ok().and(i32::try_from(off).ok())
                };
                Some([at(Access::Read)?, at(Access::Write)?])
            });
            Some(Mode { bits: 64, seg_base_mask: 0, seg_usable_mask: 0x3f, stack_bits: 64, cpl0: c.cpl == 0, sse, avx, fp_masked, x87, tlb_tables })
        }
        // Branch targets are not checked against the CS limit: CS must span 4 GiB.
        CpuMode::Protected | CpuMode::Compat if c.code_bits() == 32 && c.seg[seg::CS].limit == 0xffff_ffff => {
            let (mut seg_base_mask, mut seg_usable_mask) = (0u8, 0u8);
            for s in [seg::ES, seg::SS, seg::DS, seg::FS, seg::GS] {
                let d = &c.seg[s];
                // A CCF checks no limits or rights: it accesses memory only
                // through present, writable, expand-up data segments that
                // span 4 GiB. Anything else (a null selector, a limit) is
                // left to the runtime, instruction by instruction.
                let writable_data = d.attr & crate::cpu::Segment::ATTR_S != 0 && d.seg_type() & 0b1010 == 0b0010;
                if d.present() && writable_data && d.seg_type() & 0b0100 == 0 && d.limit == 0xffff_ffff {
                    seg_usable_mask |= 1 << s;
                }
                if d.base != 0 {
                    seg_base_mask |= 1 << s;
                }
            }
            let stack_bits = if c.seg[seg::SS].default_big() { 32 } else { 16 };
            Some(Mode { bits: 32, seg_base_mask, seg_usable_mask, stack_bits, cpl0: c.cpl == 0, sse, avx, fp_masked, x87, tlb_tables: None })
        }
        _ => None,
    }
}

impl Vcpu {
    /// Turns the binary translator on for this vCPU.
    pub fn enable_bt(&mut self, cache_bytes: usize) -> Result<(), BtError> {
        self.bt = Some(Box::new(Bt::new(cache_bytes)?));
        Ok(())
    }

    /// Runs translated code from the current RIP until it exits (or one
    /// instruction in the interpreter, where nothing can be translated).
    pub(crate) fn run_translated(&mut self) {
        let Some(mode) = bt_mode(self) else {
            if let Some(bt) = self.bt.as_mut() {
                bt.pending_chain = None;
            }
            self.run_block(false, u64::MAX);
            return;
        };
        self.sync_with_tlb(mode);
        // The IBTC first: what it holds was looked up under this very
        // context, as CCFs use it.
        let rip = self.cpu.regs.rip;
        let t = ibtc_table(mode.cpl0);
        if let Some(bt) = self.bt.as_mut() {
            let set = ibtc_index(rip);
            let tagged = mode.ibtc_key(rip);
            if let Some(i) = (set..set + IBTC_WAYS).find(|&i| bt.block.ibtc[t][i][0] == tagged) {
                let (entry, id, global) = (bt.block.ibtc[t][i][1] as *const u8, bt.ibtc[t].ids[i], bt.ibtc[t].global[i]);
                bt.stats.lookups_hit += 1;
                bt.stats.ibtc_hits += 1;
                // Recency is sampled, as in `lookup_or_translate`.
                if bt.stats.ibtc_hits % 8 == 0 {
                    bt.lru.promote(&id);
                }
                bt.chain(id, global);
                self.enter_ccf(entry, mode.bits);
                return;
            }
        }
        let slot = match self.lookup_or_translate(mode) {
            Ok(s) => s,
            Err(e) => {
                if let Some(bt) = self.bt.as_mut() {
                    bt.pending_chain = None;
                }
                self.raise(e);
                return;
            }
        };
        let code_lin = self.code_linear(rip).ok();
        let user = self.user();
        let global = |lin: u64| self.tlb.entry(lin, Access::Execute, user).is_some_and(|e| e.global);
        // The TU's code pages, and whether both are global.
        let code = match (code_lin, &slot) {
            (Some(lin), Slot::Tu(id)) => {
                let page2 = self.bt.as_ref().and_then(|bt| bt.tus[*id as usize].as_ref()).and_then(|tu| tu.page2);
                let last = page2.map_or(lin, |(lin2, _)| lin2);
                Some(([lin & !0xfff, last & !0xfff], global(lin) && global(last)))
            }
            _ => None,
        };
        let bt = self.bt.as_mut().expect("translator on");
        match slot {
            Slot::Interpret => {
                bt.pending_chain = None;
                self.callout();
            }
            Slot::Tu(id) => {
                bt.chain(id, code.is_some_and(|(_, global)| global));
                let Some(tu) = bt.tus[id as usize].as_ref() else { return };
                let entry = tu.entry;
                // Later indirect branches to here find it without the
                // dispatcher. A TU spanning two
                // pages too (a loop starting just before a page's end
                // otherwise left for the dispatcher every pass): its entry
                // goes with either page's mapping.
                if let Some((pages, global)) = code {
                    bt.fill_ibtc(t, mode.ibtc_key(tu.key.rip), entry, id, pages, global);
                }
                self.enter_ccf(entry, mode.bits);
            }
        }
    }

    /// Brings what depends on guest mappings up to date with the soft TLB
    /// (and the IBTC table of the current privilege with the mode, CS base
    /// and CPL) before a CCF runs: jumps into two-page TUs are unchained
    /// after any mapping change, and the table drops the entries whose code
    /// mapping went since it was last brought up to date (all of them after
    /// a full flush, those of non-global pages after a CR3 write, those in
    /// the page of an `invlpg`), or everything if the mode changed beyond
    /// what entries' tags tell apart (`Mode::ibtc_context`) or it fell too
    /// far behind.
    fn sync_with_tlb(&mut self, mode: Mode) {
        let rest = (mode.ibtc_context(), self.cpu.seg[seg::CS].base, self.cpu.cpl);
        let tlb = &self.tlb;
        let Some(bt) = self.bt.as_mut() else { return };
        if bt.check_cross_chains(tlb, self.cpu.cpl) {
            // Any value but the current one: everything goes.
            bt.page2_generation = tlb.generation.wrapping_add(1);
        }
        bt.check_page2_chains(tlb.generation);
        let t = ibtc_table(mode.cpl0);
        let book = &bt.ibtc[t];
        if book.context == rest && book.generation == tlb.generation {
            return;
        }
        let mut all = book.context != rest;
        if !all {
            match tlb.dropped_since(book.generation) {
                None => all = true,
                Some(dropped) => {
                    for d in dropped {
                        let book = &bt.ibtc[t];
                        match d {
                            Dropped::All => all = true,
                            Dropped::NonGlobal if book.nonglobal => {
                                bt.drop_ibtc_where(t, |_, global| !global);
                                bt.ibtc[t].nonglobal = false;
                            }
                            Dropped::NonGlobal => {}
                            // Most invlpgs are of data pages: no scan for them.
                            Dropped::Page(page) if !book.pages.contains(&page) => {}
                            Dropped::Large(base, size) if !book.pages.iter().any(|p| p & !(size - 1) == base) => {}
                            Dropped::Page(base) | Dropped::Large(base, _) => {
                                let size = if let Dropped::Large(_, size) = d { size } else { 0x1000 };
                                bt.drop_ibtc_where(t, |pages, _| pages.iter().any(|p| p & !(size - 1) == base));
                            }
                        }
                    }
                }
            }
        }
        if all {
            bt.clear_ibtc(t);
        }
        bt.ibtc[t].context = rest;
        bt.ibtc[t].generation = tlb.generation;
    }

    fn lookup_or_translate(&mut self, mode: Mode) -> Result<Slot, crate::exception::Exception> {
        let rip = self.cpu.regs.rip;
        let lin = self.code_linear(rip)?;
        let user = self.user();
        let phys = match self.tlb.entry(lin, Access::Execute, user) {
            Some(e) => e.phys_page | (lin & 0xfff),
            None => self.translate(lin, Access::Execute, user)?,
        };
        let cs_base = if mode.bits == 64 { 0 } else { self.cpu.seg[seg::CS].base };
        let key = Key { phys, rip, cs_base, mode };
        let found = self.bt.as_ref().and_then(|bt| bt.map.get(&key).copied());
        if let Some(slot) = found {
            // A TU reaching into a second page is only good while that page
            // still maps where it did.
            let page2 = match slot {
                Slot::Tu(id) => self.bt.as_ref().and_then(|bt| bt.tus[id as usize].as_ref()).and_then(|t| t.page2),
                Slot::Interpret => None,
            };
            let still = page2.is_none_or(|(lin2, phys2)| self.translate(lin2, Access::Execute, user).ok() == Some(phys2));
            let bt = self.bt.as_mut().expect("translator on");
            if still {
                bt.stats.lookups_hit += 1;
                // Recency is sampled: promoting on every lookup costs more
                // than the precision is worth.
                if let Slot::Tu(id) = slot {
                    if bt.stats.lookups_hit.is_multiple_of(8) {
                        bt.lru.promote(&id);
                    }
                }
                return Ok(slot);
            }
            bt.map.remove(&key);
            if let Slot::Tu(id) = slot {
                bt.remove_tu(id);
            }
        }
        self.bt.as_mut().expect("translator on").stats.lookups_miss += 1;
        // The TU's bytes: the rest of this page, and of the next one if the
        // TU may reach into it and it is mapped.
        let mut bytes = [0u8; MAX_TU_INSNS * 15];
        let first = (0x1000 - (phys & 0xfff) as usize).min(bytes.len());
        self.mem.read(phys, &mut bytes[..first]);
        let mut have = first;
        let mut second = None;
        if first < bytes.len() {
            let next_lin = (lin & !0xfff).wrapping_add(0x1000);
            let next_lin = if mode.bits == 64 { next_lin } else { next_lin & 0xffff_ffff };
            // Looked at without marking the page accessed: the TU may end
            // before it (marked below if not).
            if let Ok(next) = crate::mmu::peek(&self.cpu, &self.mem, next_lin, Access::Execute, user).map(|t| t.phys) {
                self.mem.read(next, &mut bytes[first..]);
                have = bytes.len();
                second = Some((next_lin, next & !0xfff));
            }
        }
        let id = self.bt.as_mut().expect("translator on").next_id();
        let started = std::time::Instant::now();
        let outcome = translate::translate(&bytes[..have], rip, mode, id);
        self.stats.vmm_ns += started.elapsed().as_nanos() as u64;
        let mut pages = vec![phys & !0xfff];
        let slot = match outcome {
            Outcome::Interpret => {
                self.bt.as_mut().expect("translator on").free_ids.push(id);
                Slot::Interpret
            }
            Outcome::Ccf(ccf) => {
                let page2 = if ccf.guest_bytes > first { second } else { None };
                if let Some((lin2, p)) = page2 {
                    pages.push(p);
                    // Its code is fetched from there: accessed now, as
                    // the interpreter's fetch would mark it.
                    let _ = self.translate(lin2, Access::Execute, user);
                }
                match self.publish(&ccf, key, id, lin & !0xfff, page2) {
                    Some(()) => Slot::Tu(id),
                    None => {
                        self.bt.as_mut().expect("translator on").free_ids.push(id);
                        Slot::Interpret
                    }
                }
            }
        };
        for &page in &pages {
            self.mark_code_page(page);
        }
        let bt = self.bt.as_mut().expect("translator on");
        bt.map.insert(key, slot);
        for page in pages {
            bt.by_page.entry(page).or_default().push(key);
        }
        // Translating is the VMM's work, not the guest's: a guest timing a
        // loop whose exit path runs for the first time (Linux's quick PIT
        // calibration of the TSC allows some 24 us of error) must not see it.
        self.clock.hide(started.elapsed());
        Ok(slot)
    }

    /// Copies a CCF into the code cache (evicting to make room) as TU `id`.
    fn publish(&mut self, ccf: &Ccf, key: Key, id: u32, lin_page: u64, page2: Option<(u64, u64)>) -> Option<()> {
        let bt = self.bt.as_mut()?;
        let (base, class) = match bt.alloc_slot(ccf.code.len()) {
            Ok(slot) => slot?,
            Err(e) => {
                tracing::error!(target: "translator", "{e}; falling back to the interpreter");
                self.bt = None;
                return None;
            }
        };
        // A flush while making room forgot every id: take this TU's back.
        if bt.tus.len() <= id as usize {
            bt.tus.resize_with(id as usize + 1, || None);
            bt.free_ids = (0..id).rev().collect();
        }
        bt.arena.patch(base, &ccf.code);
        // Every TU has at most two Next stubs (a TU ends at its first
        // control transfer); the kick handler knows them all.
        let stubs: Vec<(*const u8, i32)> = ccf
            .exits
            .iter()
            .filter(|e| e.reason == ExitReason::Next)
            .map(|e| {
                let (at, rel) = e.link();
                (base.wrapping_add(at), rel)
            })
            .collect();
        if stubs.len() > 2 {
            tracing::error!(target: "translator", rip = format_args!("{:#x}", key.rip), "a TU with {} chainable exits cannot be kicked: interpreted", stubs.len());
            bt.free_slots[class].push(base);
            return None;
        }
        bt.kick.set(base, SLOT_CLASSES[class], &stubs);
        let s = &mut bt.stats;
        s.tus[if key.mode.bits == 64 { 2 } else { 1 }] += 1;
        s.ident += ccf.counts.ident as u64;
        s.mem += ccf.counts.mem as u64;
        s.control += ccf.counts.control as u64;
        s.sensitive += ccf.counts.sensitive as u64;
        s.code_bytes += ccf.code.len() as u64;
        tracing::debug!(
            target: "translator",
            rip = format_args!("{:#x}", key.rip),
            bits = key.mode.bits,
            insns = ccf.guest.len(),
            ident = ccf.counts.ident,
            mem = ccf.counts.mem,
            control = ccf.counts.control,
            sensitive = ccf.counts.sensitive,
            host_bytes = ccf.code.len(),
            "TU translated"
        );
        if let Some(f) = bt.perf_map.as_mut() {
            use std::io::Write;
            let _ = writeln!(f, "{:x} {:x} tu_{:x}_{}", base as u64, ccf.code.len(), key.rip, key.mode.bits);
        }
        bt.lru.put(id, ());
        let tu = Tu {
            key,
            base,
            class,
            entry: base.wrapping_add(ccf.entry),
            exits: ccf.exits.clone(),
            lin_page,
            page2,
            len: ccf.code.len(),
            rip_map: ccf.rip_map.clone().into_boxed_slice(),
            incoming: Vec::new(),
            cross_in: false,
            outgoing: Vec::new(),
        };
        let slot = bt.tus.get_mut(id as usize)?;
        *slot = Some(tu);
        Some(())
    }

    /// Loads the guest registers into the block, runs the CCF at `entry`
    /// (of code size `bits`), and takes the registers back: R8..R15 only
    /// from 64-bit code, since 32-bit CCFs borrow them as scratch without
    /// saving them (the guest's values stay in `cpu.regs`), except the one
    /// that holds guest RSP there.
    fn enter_ccf(&mut self, entry: *const u8, bits: u32) {
        let user = self.user();
        let (tlb_read, tlb_write) = (self.tlb.table_addr(Access::Read, user), self.tlb.table_addr(Access::Write, user));
        let bt = self.bt.as_mut().expect("translator on");
        let b = &mut *bt.block;
        b.regs.gpr = self.cpu.regs.gpr;
        if bits == 32 {
            // No guest registers above R7: the probe's constants ride there,
            // and guest RSP.
            b.regs.gpr[tlb::R32_READ_TABLE as usize] = tlb_read;
            b.regs.gpr[tlb::R32_WRITE_TABLE as usize] = tlb_write;
            b.regs.gpr[tlb::R32_INDEX_MASK as usize] = tlb::INDEX_MASK;
            b.regs.gpr[tlb::R32_PAGE_SHIFT as usize] = tlb::PAGE_SHIFT;
            // Guest RSP rides in a host register of its own too.
            b.regs.gpr[tlb::R32_RSP as usize] = self.cpu.regs.gpr[4];
        }
        b.regs.rip = self.cpu.regs.rip;
        let f = self.cpu.regs.rflags;
        b.host_flags = (f & rflags::ARITH) | rflags::FIXED1;
        b.vif = (f & rflags::IF != 0) as u8;
        b.vdf = (f & rflags::DF != 0) as u8;
        b.irq_pending = self.platform.intr_pending() as u8;
        b.vflags = (f & !(rflags::ARITH | rflags::IF | rflags::DF | rflags::RF | rflags::VM)) | rflags::FIXED1;
        let c = &self.cpu;
        b.cr0 = c.cr0;
        (b.gdtr_base, b.gdtr_limit) = (c.gdtr.base, c.gdtr.limit as u64);
        (b.idtr_base, b.idtr_limit) = (c.idtr.base, c.idtr.limit as u64);
        (b.ldtr_sel, b.tr_sel) = (c.ldtr.selector as u64, c.tr.selector as u64);
        for (i, s) in self.cpu.seg.iter().enumerate() {
            b.seg_base[i] = s.base;
            b.seg_sel[i] = s.selector as u64;
        }
        b.tlb_read = tlb_read;
        b.tlb_write = tlb_write;
        b.budget = CHAIN_BUDGET;
        b.target = entry as u64;
        b.exit_stub = bt.exit;
        // The guest's SSE state is loaded by the first CCF that needs it,
        // and saved back to its area by the exit.
        b.fpu_area = self.fpu.area_ptr() as u64;
        b.fpu_xcr0 = self.fpu.ccf_components();
        b.fpu_saved = 0;
        b.fpu_load = bt.fpu_load;
        b.fpu_ready = bt.fpu_ready;
        b.fpu_enter = bt.fpu_load;
        bt.stats.entries += 1;
        let kicker = bt.kicking.as_ref().map(|(k, _)| k);
        kicker.inspect(|k| k.enter_or_leave_ccf());
        (bt.entry)();
        kicker.inspect(|k| k.enter_or_leave_ccf());
        if bt.block.fpu_saved != 0 {
            self.fpu.normalize_after_ccf();
        }
        let b = &*bt.block;
        let guest_regs = if bits == 64 { 16 } else { 8 };
        self.cpu.regs.gpr[..guest_regs].copy_from_slice(&b.regs.gpr[..guest_regs]);
        if bits == 32 {
            self.cpu.regs.gpr[4] = b.regs.gpr[tlb::R32_RSP as usize];
        }
        self.cpu.regs.rip = b.regs.rip;
        let virt = (rflags::IF * b.vif as u64) | (rflags::DF * b.vdf as u64);
        self.cpu.regs.rflags =
            (self.cpu.regs.rflags & !(rflags::ARITH | rflags::IF | rflags::DF)) | (b.host_flags & rflags::ARITH) | virt;
        let site = b.exit_site;
        let reason = ExitReason::from_raw(b.exit_reason);
        bt.stats.exits[reason.unwrap_or(ExitReason::Fault) as usize] += 1;
        match reason {
            Some(ExitReason::Next) => bt.pending_chain = Some(((site >> 8) as u32, (site & 0xff) as u8)),
            Some(ExitReason::Indirect) => {
                // A 64-bit target must be canonical, or the branch faults
                // with nothing done: replay it in the interpreter.
                let rip = self.cpu.regs.rip;
                if self.cpu.mode == CpuMode::Long && !crate::interp::access::is_canonical(rip) {
                    let (id, stub) = ((site >> 8) as usize, (site & 0xff) as usize);
                    let branch = bt.tus.get(id).and_then(Option::as_ref).and_then(|t| t.exits.get(stub)).map(|e| e.rip);
                    if let Some(branch) = branch {
                        self.cpu.regs.gpr[4] = bt.block.scratch[BtBlock::SLOT_OLD_RSP];
                        self.cpu.regs.rip = branch;
                        self.callout();
                    }
                }
            }
            // A host fault (SIGFPE) in the CCF: the runtime runs the
            // instruction, raising the guest's exception.
            Some(ExitReason::Interpret | ExitReason::Fault) | None => self.callout(),
            Some(ExitReason::HostFault) => {
                let fault = fault::take_host_fault();
                let (what, rip) = bt.describe_host_fault(fault);
                if let Some(rip) = rip {
                    self.cpu.regs.rip = rip;
                }
                self.exit = Some(crate::interp::VmExit::InternalError(what));
            }
        }
    }

    /// Runs the instruction at RIP in the shared Rust semantics, for
    /// translated code, and counts it by mnemonic.
    fn callout(&mut self) {
        let rip = self.cpu.regs.rip;
        if let Some(m) = self.interpret_one() {
            tracing::debug!(target: "callout", rip = format_args!("{rip:#x}"), mnemonic = ?m, "callout");
            if let Some(bt) = self.bt.as_mut() {
                *bt.stats.callouts.entry(m).or_default() += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
